"""`cpab` against libcpab 0.1.3 (PyPI; a maintained pure-PyTorch fork of the libcpab the official code uses).

The constraint matrix is compared bit for bit; the velocity fields of the same theta (libcpab holding
cpab's basis, so that the comparison does not depend on this machine's LAPACK); the integrators to
within libcpab's own integration error; and the shipped bases with the ones libcpab computes under the
reference LAPACK setup of `cpab.make_bases` (a subprocess: OpenBLAS reads its settings when it loads).
"""
import importlib.metadata
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cpab import CPAB
from cpab.basis import SHIPPED, libcpab_constraint_matrix, null_space_basis, shipped_basis_name
from cpab.make_bases import BASES_DIR, REFERENCE_CORE_LINE, REFERENCE_LAPACK_ENV, reference_lapack_env

libcpab = pytest.importorskip("libcpab", reason="libcpab is not installed (pip install -r requirements-dev.txt)")
from libcpab.transformer import CPAB_transformer_slow  # noqa: E402

VARIANTS = ((False, False), (False, True), (True, False), (True, True))


def _libcpab(tess, zero_boundary=False, volume_preservation=False):
    """libcpab's Cpab, its basis recomputed here (libcpab otherwise reuses a pickle in site-packages)."""
    return libcpab.Cpab(list(tess), zero_boundary=zero_boundary, volume_perservation=volume_preservation,
                        override=True)


def test_libcpab_version():
    assert importlib.metadata.version("libcpab") == "0.1.3"


@pytest.mark.parametrize("tess", [(1, 1), (2, 3), (3, 2), (4, 4), (6, 6)])
def test_constraint_matrix_is_libcpabs_bit_for_bit(tess):
    for zero_boundary, volume_preservation in VARIANTS if tess != (6, 6) else VARIANTS[:2]:
        L = _libcpab(tess, zero_boundary, volume_preservation).tesselation.L
        ours = libcpab_constraint_matrix(*tess, zero_boundary, volume_preservation)
        assert ours.shape == L.shape and np.array_equal(ours, L), (tess, zero_boundary, volume_preservation)


@pytest.mark.parametrize("tess,zero_boundary,volume_preservation",
                         [((4, 4), False, False), ((6, 6), False, False), ((4, 4), False, True),
                          ((3, 3), True, False), ((3, 2), True, True)])
def test_same_theta_same_velocity_field(tess, zero_boundary, volume_preservation):
    # v_cpab(p) = 2 v_libcpab((p + 1) / 2): theta has libcpab's meaning, on and (valid outside) off the domain.
    model = CPAB(tess, zero_boundary=zero_boundary, volume_preservation=volume_preservation).double()
    T = _libcpab(tess, zero_boundary, volume_preservation)
    # libcpab's own basis (from this machine's LAPACK) spans the same space: an orthogonal change of theta.
    rotation = model.basis01.numpy().T @ T.params.basis
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(model.dim), atol=1e-10)
    T.params.basis = model.basis01.numpy().copy()
    reach = 1.0 if zero_boundary else 1.5
    for _ in range(2):
        theta = torch.randn(1, model.dim, dtype=torch.float64)
        points = (torch.rand(1, 3000, 2, dtype=torch.float64) * 2 - 1) * reach
        ours = model.velocity(points, theta)[0]
        theirs = 2 * T.calc_vectorfield(((points[0] + 1) / 2).T.contiguous(), theta).T
        assert ours.abs().max() > 0.1  # a real field
        assert (ours - theirs).abs().max() < 1e-6


def test_same_theta_same_transformation_up_to_integration_error():
    model = CPAB((4, 4))
    T = _libcpab((4, 4))
    T.params.basis = model.basis01.numpy().copy()
    theta = torch.randn(3, model.dim)
    points = torch.rand(3, 500, 2) * 2 - 1
    ours = model.transform(points, theta)
    theirs = 2 * CPAB_transformer_slow(((points + 1) / 2).permute(0, 2, 1).contiguous(), theta, T.params) - 1
    assert (ours - points).norm(dim=-1).mean() > 0.1
    # libcpab's 50-step scheme is within ~3e-4 of a fine RK4 solution, cpab's within ~1e-4.
    assert (ours - theirs.permute(0, 2, 1)).abs().max() < 2e-3


_REFERENCE_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import libcpab
    bases = {}
    for nx, ny, zb, vp in %r:
        bases[f"{nx}_{ny}_{int(zb)}_{int(vp)}"] = libcpab.Cpab([nx, ny], zero_boundary=zb,
                                                               volume_perservation=vp, override=True).params.basis
    np.savez(sys.argv[1], **bases)
""") % (SHIPPED,)


@pytest.mark.slow
def test_shipped_bases_are_libcpabs_under_the_reference_lapack(tmp_path):
    out = tmp_path / "libcpab_bases.npz"
    child = subprocess.run([sys.executable, "-c", _REFERENCE_SCRIPT, str(out)], env=reference_lapack_env(),
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-2000:]
    if REFERENCE_CORE_LINE not in child.stderr + child.stdout:
        pytest.skip(f"OpenBLAS did not report {REFERENCE_CORE_LINE!r} under {REFERENCE_LAPACK_ENV} (not an "
                    f"OpenBLAS numpy/scipy, or a CPU without AVX2): libcpab's SVD basis here is another "
                    f"rotation, not comparable with the shipped files")
    with np.load(out) as theirs:
        for nx, ny, zb, vp in SHIPPED:
            with np.load(BASES_DIR / shipped_basis_name(nx, ny, zb, vp)) as data:
                shipped = data["basis"]
            reference = theirs[f"{nx}_{ny}_{int(zb)}_{int(vp)}"]
            assert shipped.shape == reference.shape
            np.testing.assert_array_equal(shipped, reference)
            np.testing.assert_array_equal(null_space_basis(nx, ny, zb, vp), shipped)  # the default basis is the file
