"""Regenerate (or check) the libcpab bases shipped in cpab/bases/.

    python -m cpab.make_bases           # rewrite cpab/bases/*.npz for every size in cpab.basis.SHIPPED
    python -m cpab.make_bases --check   # recompute and compare with the shipped files (exit 1 if they differ)

Each file holds `basis` (float64, (6 * 4 nx ny, d)): libcpab's constraint matrix
(`cpab.basis.libcpab_constraint_matrix`) through libcpab's null-space routine
(`cpab.basis.libcpab_svd_basis`: numpy's SVD, LAPACK gesdd like libcpab's scipy.linalg.svd), and
`provenance`, a line naming the setup that computed it.

The SVD's null vectors are not reproducible across machines: the null space is a cluster of ~1e-15
singular values, and OpenBLAS's kernels for different CPUs (SkylakeX, Haswell, Sandybridge) or a
different thread count return different rotations of it (measured for 4x4 and 6x6: bases up to 0.56
apart, |R^T B - I| ~ 1.4), in libcpab as here. So the files are computed under one fixed setup that
any x86-64 CPU with AVX2 can reproduce, `REFERENCE_LAPACK_ENV` (OpenBLAS's Haswell kernels, one
thread): this script runs itself again in a fresh interpreter with those variables set (OpenBLAS reads
them when it loads) and checks that OpenBLAS reports the Haswell core. tests/cpab/test_libcpab.py
checks the files against libcpab 0.1.3 run under the same setup.
"""
import argparse
import os
import pathlib
import subprocess
import sys

import numpy as np

from .basis import SHIPPED, libcpab_constraint_matrix, libcpab_svd_basis, shipped_basis_name

BASES_DIR = pathlib.Path(__file__).resolve().with_name("bases")
REFERENCE_LAPACK_ENV = {"OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
REFERENCE_CORE_LINE = "Core: Haswell"  # what OpenBLAS prints with OPENBLAS_VERBOSE=2 when it obeys


def reference_lapack_env():
    """os.environ plus `REFERENCE_LAPACK_ENV` and OPENBLAS_VERBOSE=2 (OpenBLAS then prints its core)."""
    return {**os.environ, **REFERENCE_LAPACK_ENV, "OPENBLAS_VERBOSE": "2"}


def _rerun_under_reference_lapack(argv):
    child = subprocess.run([sys.executable, "-m", "cpab.make_bases", *argv], env=reference_lapack_env(),
                           capture_output=True, text=True)
    print(child.stdout, end="")
    errors = "\n".join(line for line in child.stderr.splitlines() if not line.startswith("Core:"))
    if errors:
        print(errors, file=sys.stderr)
    if REFERENCE_CORE_LINE not in child.stderr + child.stdout:
        print(f"error: OpenBLAS did not report {REFERENCE_CORE_LINE!r} under {REFERENCE_LAPACK_ENV} "
              f"(numpy's LAPACK is not OpenBLAS, or this CPU cannot run its Haswell kernels); the bases "
              f"must be computed on an x86-64 CPU with AVX2", file=sys.stderr)
        return 1
    return child.returncode


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m cpab.make_bases", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare the shipped files with a fresh computation instead of writing them")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if any(os.environ.get(key) != value for key, value in REFERENCE_LAPACK_ENV.items()):
        return _rerun_under_reference_lapack(argv)  # numpy has loaded OpenBLAS already: a fresh interpreter
    BASES_DIR.mkdir(exist_ok=True)
    differ = 0
    for nx, ny, zero_boundary, volume_preservation in SHIPPED:
        basis = libcpab_svd_basis(libcpab_constraint_matrix(nx, ny, zero_boundary, volume_preservation))
        path = BASES_DIR / shipped_basis_name(nx, ny, zero_boundary, volume_preservation)
        if args.check:
            if not path.is_file():
                print(f"{path.name}: missing")
                differ += 1
                continue
            with np.load(path) as data:
                shipped = data["basis"]
            if shipped.shape != basis.shape:
                print(f"{path.name}: shape {shipped.shape}, computed {basis.shape}")
                differ += 1
                continue
            gap = float(np.abs(shipped - basis).max())
            differ += gap > 1e-12
            print(f"{path.name}: {basis.shape}, max |shipped - computed| = {gap:.1e}")
        else:
            provenance = (f"libcpab's constraint matrix and null-space routine (SVD, s <= 1e-6): numpy "
                          f"{np.__version__} linalg.svd (LAPACK gesdd), OpenBLAS Haswell kernels, 1 thread")
            np.savez_compressed(path, basis=basis, provenance=np.array(provenance))
            print(f"wrote {path} {basis.shape}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
