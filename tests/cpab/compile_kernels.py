"""Ahead-of-time compilation of cpab's Triton kernels for NVIDIA GPUs, without a GPU.

`python tests/cpab/compile_kernels.py [--arch 80 90] [--jobs N]` compiles every specialisation
`cpab.fused.specialisations` lists (all modes, both dtypes) for the tessellations of the released
configs (4 x 4 partial, 6 x 6 global), and the register-heaviest ones (the adjoint cells kernels, float64)
for a few more (2 x 2, 8 x 8, the configs' zero-boundary / volume-preserving variants), with Triton's
compiler (`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`) and then ptxas -v on the
PTX, as Triton runs it. Prints one JSON line per compile (registers, spill stores / loads, seconds) and a
summary; exits 1 on a compile error or a register spill. Must run without TRITON_INTERPRET (the test
starts it in a subprocess). Compiles are cached by Triton (~/.triton/cache), so reruns are fast.
"""
import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

FLOAT_ARGS = ("half_nx", "half_ny", "max_i", "max_j", "eps")
CONFIG_TESSELLATIONS = ((4, 4), (6, 6))
EXTRA_MODELS = (((2, 2), False, False), ((8, 8), False, False), ((4, 4), False, True), ((4, 4), True, True),
                ((6, 6), False, True), ((6, 6), True, False), ((6, 6), True, True))


def specialisations():
    from cpab import CPAB, fused

    full = fused.specialisations([CPAB(tess) for tess in CONFIG_TESSELLATIONS])
    extra = fused.specialisations([CPAB(tess, zero_boundary=zb, volume_preservation=vp)
                                   for tess, zb, vp in EXTRA_MODELS])
    heavy = [s for s in extra if s[0] == "_cells_kernel" and s[1] == "fp64" and s[2]["BACKWARD"]]
    specs, seen = [], set()
    for spec in full + heavy:
        key = (spec[0], spec[1], tuple(sorted(spec[2].items())), spec[3])
        if key not in seen:
            seen.add(key)
            specs.append(spec)
    return specs


def compile_one(job):
    name, dtype, constexprs, warps, arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource

    from cpab import fused, kernels

    start = time.perf_counter()
    kernel = getattr(kernels, name)
    f64 = fused.F64_POINTERS[name.strip("_").split("_")[0]]
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = "*fp64" if arg in f64 else f"*{dtype}"
        else:
            signature[arg] = "fp32" if arg in FLOAT_ARGS else "i32"
    record = dict(kernel=name, dtype=dtype, constexprs=constexprs, num_warps=warps, arch=arch)
    try:
        options = {"num_warps": warps}
        if name != "_cells_kernel":
            options["enable_fp_fusion"] = False
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", arch, 32), options=options)
        ptx = compiled.asm["ptx"]
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
            handle.write(ptx)
        try:
            log = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2",
                                  f"--gpu-name={sm_arch_from_capability(arch)}", handle.name, "-o", os.devnull],
                                 capture_output=True, text=True, check=True).stderr
        finally:
            os.remove(handle.name)
        registers = re.search(r"Used (\d+) registers", log)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        record.update(ok=True, registers=int(registers.group(1)), spill_stores=int(spills.group(1)),
                      spill_loads=int(spills.group(2)), approximate_division="div.full.f32" in ptx,
                      fma=name == "_points_kernel" and "fma.rn" in ptx)
    except Exception as error:  # reported in the record; the caller fails on it
        record.update(ok=False, error=f"{type(error).__name__}: {str(error)[-2000:]}")
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("run without TRITON_INTERPRET (the interpreter does not compile)")
    jobs = [(name, dtype, constexprs, warps, arch) for arch in args.arch
            for name, dtype, constexprs, warps in specialisations()]
    records = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for record in pool.map(compile_one, jobs):
            records.append(record)
            print(json.dumps(record), flush=True)
    failed = [r for r in records if not r["ok"] or r["spill_stores"] or r["spill_loads"]
              or r["approximate_division"] or r["fma"]]
    good = [r for r in records if r["ok"]]
    print(json.dumps(dict(summary=True, compiled=len(good), failed=len(failed), arches=args.arch,
                          max_registers=max((r["registers"] for r in good), default=0),
                          spills=sum(r["spill_stores"] + r["spill_loads"] for r in good),
                          seconds=round(sum(r["seconds"] for r in records), 1))))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
