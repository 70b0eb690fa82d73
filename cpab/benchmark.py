"""`python -m cpab.benchmark`: CPAB fit and dense-warp timings, fast path (Triton) vs PyTorch reference.

Timings, at the CPABMM shapes for batch size 8 (`--batch`; 2 by default on CPU):
- fit time per method (adam: `CPAB.fit(method="adam")`, the faithful fit, on CUDA replayed from a CUDA
  graph captured at the warm-up run; gauss_newton: `CPAB.fit(method="gauss_newton")`) for the 10 partial
  warps per sample (5 keypoints each, 4 x 4 tessellation, 100 iterations: 80 transforms) and the global
  warp (50 keypoints, 6 x 6, 150 iterations: 8 transforms), with the mean keypoint residual |T(x) - y|
  before and after;
- dense-grid warp time of those 88 transforms at 64^2 and 256^2, forward and forward+backward (w.r.t.
  theta);
each for the fast path (backend "triton") and the reference (backend "reference", on the same device),
and their ratio, with the device named. Keypoints: x uniform in [-0.9, 0.9]^2, y = T_theta*(x) for a
random theta* (scale `THETA_SCALE`), fixed seed. Times are the median of 5 runs after one warm-up run
(which compiles the kernels and captures the graphs), with CUDA synchronised around each run; on CPU
one run, no warm-up. Without CUDA the sizes are reduced (said in the header) and the fast path is not
timed unless `--interpret` is given (the Triton interpreter checks correctness, it is not fast).
`--quick` is the CI smoke test: tiny sizes.

`--count` prints instead the device work of the fast path counted on CPU with `cpab.counting` (kernel
launches: aten operators that run a kernel plus Triton launches; host synchronisations) for an Adam
iteration and fit, a Gauss-Newton iteration and fit, transform / grid forward and backward, and the same
for the reference backend. The Triton path runs under the interpreter there: when TRITON_INTERPRET=1 is
not set, the benchmark runs itself again in a subprocess with it set.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

from . import fused
from .counting import count_device_work
from .transform import CPAB

THETA_SCALE = 0.5
METHODS = ("adam", "gauss_newton")
GN_ITERATIONS = 5
ADAM_ITERATIONS = 100   # CPABMM's partial fit (the global one runs 150)
GN_FIT_ITERATIONS = 10  # CPAB.fit's Gauss-Newton default


def sizes(quick, on_cuda, batch):
    """The benchmark's sizes: full CPABMM shapes on CUDA, reduced on CPU, tiny with quick.

    batch None means 8 on CUDA (CPABMM's) and 2 on CPU.
    """
    if quick:
        return dict(label="quick (CI smoke test: tiny sizes, 10 global keypoints)", batch=1, global_kps=10,
                    partial_iters=2, global_iters=2, gn_iters=2, grids=(8, 12), repeats=1)
    if on_cuda:
        batch = 8 if batch is None else batch
        return dict(label=f"full (CPABMM shapes, batch {batch})", batch=batch, global_kps=50, partial_iters=100,
                    global_iters=150, gn_iters=GN_ITERATIONS, grids=(64, 256), repeats=5)
    batch = 2 if batch is None else batch
    return dict(label=f"REDUCED for CPU (batch {batch} instead of 8, 10/15 fit iterations instead of 100/150, "
                      "grids 16^2 and 24^2 instead of 64^2 and 256^2)",
                batch=batch, global_kps=50, partial_iters=10, global_iters=15, gn_iters=2, grids=(16, 24), repeats=1)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def timed(fn, device, repeats):
    """(median milliseconds over `repeats` runs, last result); on CUDA after one warm-up run (compiles)."""
    result = fn() if device.type == "cuda" else None
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1000.0 * (time.perf_counter() - start))
    return statistics.median(times), result


def groups(batch, global_kps=50):
    """The CPABMM transforms of a batch: (name, tessellation, transforms, keypoints per transform)."""
    return (("partial", (4, 4), 10 * batch, 5), ("global", (6, 6), batch, global_kps))


def keypoints(model, transforms, n_kps, device, seed):
    """Driving keypoints x and source keypoints y = T_theta*(x), both (transforms, n_kps, 2)."""
    gen = torch.Generator().manual_seed(seed)
    x = 1.8 * torch.rand(transforms, n_kps, 2, generator=gen) - 0.9
    theta = THETA_SCALE * torch.randn(transforms, model.dim, generator=gen)
    reference = CPAB((model.nx, model.ny), backend="reference")
    with torch.no_grad():
        y = reference.transform(x, theta)
    return x.to(device), y.to(device)


def residual(model, x, y, theta):
    """Mean keypoint distance |T_theta(x) - y| in [-1, 1] units."""
    with torch.no_grad():
        return (model.transform(x, theta) - y).norm(dim=-1).mean().item()


def fmt_ms(value):
    return f"{value:10.2f} ms" if value is not None else "       n/a   "


def fmt_ratio(fast, reference):
    return f"x{reference / fast:8.3g}" if fast and reference else "      n/a"


def run(quick=False, device=None, batch=None, interpret=False, out=print):
    """Runs the timing benchmark and prints every row with `out`; returns the rows (strings)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    size = sizes(quick, on_cuda, batch)
    fast_ok = fused.HAS_TRITON and (on_cuda or (interpret and fused.interpreter_available()))
    if on_cuda:
        fast_note = "Triton kernels (fits replayed from CUDA graphs)"
    elif fast_ok:
        fast_note = "Triton INTERPRETER on CPU (correctness tool, slow: not a speed figure)"
    else:
        fast_note = "not timed without CUDA (pass --interpret to run the Triton interpreter)"
    rows = []

    def emit(line):
        rows.append(line)
        out(line)

    emit(f"device: {device_name(device)} | torch {torch.__version__} | sizes: {size['label']}")
    emit(f"fast path: {fast_note}; reference: cpab.integrate (PyTorch) on the same device")
    backends = (("fast", "triton"), ("ref", "reference")) if fast_ok else (("ref", "reference"),)
    for method in METHODS:
        for name, tess, transforms, n_kps in groups(size["batch"], size["global_kps"]):
            iters = size["gn_iters"] if method == "gauss_newton" else size[f"{name}_iters"]
            times, after = {}, {}
            x, y = keypoints(CPAB(tess), transforms, n_kps, device, seed=len(name))
            before = (x - y).norm(dim=-1).mean().item()
            for label, backend in backends:
                model = CPAB(tess, backend=backend).to(device)
                def run_fit(model=model, x=x, y=y, method=method, iters=iters):
                    return model.fit(x, y, method=method, iterations=iters)
                times[label], theta = timed(run_fit, device, size["repeats"])
                after[label] = residual(model, x, y, theta)
            res = " ".join(f"{label} {after[label]:.4f}" for label, _ in backends)
            emit(f"fit  {method:12s} {name:7s} {transforms:3d}x({n_kps:2d} kps, {tess[0]}x{tess[1]}, {iters:3d} it) "
                 f"fast {fmt_ms(times.get('fast'))} ref {fmt_ms(times.get('ref'))} "
                 f"{fmt_ratio(times.get('fast'), times.get('ref'))} | residual {before:.4f} -> {res}")
    for side in size["grids"]:
        for mode in ("forward", "forward+backward"):
            times = {}
            for label, backend in backends:
                total = 0.0
                for _name, tess, transforms, _ in groups(size["batch"]):
                    model = CPAB(tess, backend=backend).to(device)
                    theta = THETA_SCALE * torch.randn(transforms, model.dim, device=device)
                    if mode == "forward":
                        def step(model=model, theta=theta, side=side):
                            with torch.no_grad():
                                return model.grid(theta, (side, side))
                    else:
                        theta.requires_grad_(True)

                        def step(model=model, theta=theta, side=side):
                            grid = model.grid(theta, (side, side))
                            return torch.autograd.grad(grid.square().sum(), theta)[0]
                    elapsed, _ = timed(step, device, size["repeats"])
                    total += elapsed
                times[label] = total
            count = sum(g[2] for g in groups(size["batch"]))
            emit(f"warp {side:4d}x{side:<4d} {count:3d} transforms {mode:16s} fast {fmt_ms(times.get('fast'))} "
                 f"ref {fmt_ms(times.get('ref'))} {fmt_ratio(times.get('fast'), times.get('ref'))}")
    return rows


# ------------------------------------------------------------------------------------------ counting
def _count_problem(backend):
    """A tiny problem (launch and sync counts do not depend on the sizes, tested): 2 transforms of one
    keypoint on a 1 x 1 tessellation, steps 2, refine 1 (CPU)."""
    gen = torch.Generator().manual_seed(0)
    model = CPAB((1, 1), steps=2, refine=1, backend=backend)
    x = 1.6 * torch.rand(2, 1, 2, generator=gen) - 0.8
    y = x + 0.05 * torch.randn(x.shape, generator=gen)
    theta = 0.3 * torch.randn(2, model.dim, generator=gen)
    return model, x, y, theta


def counts(backend="triton", adam_iterations=ADAM_ITERATIONS, gn_iterations=GN_FIT_ITERATIONS):
    """Device work of the fast path (or the reference) counted on CPU: {name: Counts}.

    Per-iteration rows are the difference between fits of k + 1 and k iterations (k = 1), so they exclude
    the fit's start; whole-fit rows run the stated number of iterations. First-use caches are warmed up
    before anything is counted."""
    model, x, y, theta = _count_problem(backend)

    def fit(method, iterations):
        return lambda: model.fit(x, y, method=method, iterations=iterations)

    def backward(forward):
        leaf = theta.clone().requires_grad_(True)
        out = forward(leaf)
        cotangent = torch.ones_like(out)
        return lambda: torch.autograd.grad(out, leaf, cotangent, retain_graph=True)

    calls = {
        "adam fit, 1 iteration": fit("adam", 1), "adam fit, 2 iterations": fit("adam", 2),
        f"adam fit, {adam_iterations} iterations": fit("adam", adam_iterations),
        "gauss_newton fit, 1 iteration": fit("gauss_newton", 1),
        "gauss_newton fit, 2 iterations": fit("gauss_newton", 2),
        f"gauss_newton fit, {gn_iterations} iterations": fit("gauss_newton", gn_iterations),
        "transform forward": lambda: model.transform(x, theta),
        "transform backward": backward(lambda leaf: model.transform(x, leaf)),
        "grid forward": lambda: model.grid(theta, (4, 4)),
        "grid backward": backward(lambda leaf: model.grid(leaf, (4, 4))),
        "transform_jacobian": lambda: model.transform_jacobian(x, theta),
    }
    for name in ("adam fit, 1 iteration", "gauss_newton fit, 1 iteration", "transform forward"):
        calls[name]()  # warm-up: first-use caches (the basis in the dtype, compiled kernels)
    return {name: count_device_work(call) for name, call in calls.items()}


def per_iteration(result, method):
    one, two = result[f"{method} fit, 1 iteration"], result[f"{method} fit, 2 iterations"]
    return two.launches - one.launches, two.syncs - one.syncs


def print_counts(out=print, adam_iterations=ADAM_ITERATIONS, gn_iterations=GN_FIT_ITERATIONS):
    """Prints the counts of both backends; returns {backend: counts}."""
    both = {}
    out("device work counted on CPU by cpab.counting (launches: aten kernels + Triton launches; syncs: host "
        "synchronisations on CUDA, emulated)")
    for backend in ("triton", "reference"):
        result = counts(backend, adam_iterations, gn_iterations)
        both[backend] = result
        label = "fast path (Triton kernels, interpreter)" if backend == "triton" else "reference (PyTorch)"
        for method in METHODS:
            launches, syncs = per_iteration(result, method)
            out(f"{label:40s} {method:12s} per iteration: {launches:5d} launches, {syncs:3d} syncs")
        for name, c in result.items():
            if "iteration" in name and not name.endswith(f"{adam_iterations} iterations") \
                    and not name.endswith(f"{gn_iterations} iterations"):
                continue
            out(f"{label:40s} {name:32s}: {c.launches:5d} launches, {c.syncs:3d} syncs")
    out("a training step and a demo batch of a model built on cpab: count them with the same counter, "
        "cpab.counting.count_device_work (CPABMM's: python -m bench.counts)")
    return both


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke test)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size (10 partial + 1 global transforms each); default 8 on CUDA, 2 on CPU")
    parser.add_argument("--interpret", action="store_true",
                        help="without CUDA, also run the fast path through the Triton interpreter (slow)")
    parser.add_argument("--count", action="store_true",
                        help="print launch and host-sync counts (on CPU, Triton interpreter) instead of timings")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.batch is not None and args.batch < 1:
        parser.error("--batch must be positive")
    wants_interpreter = args.count or (args.interpret and not torch.cuda.is_available())
    if wants_interpreter and fused.HAS_TRITON and not fused.interpreter_available():
        if "cpab.kernels" in sys.modules:
            parser.error("the Triton interpreter is off in this process: set TRITON_INTERPRET=1 before cpab's "
                         "kernels are first used")
        # The kernels read TRITON_INTERPRET when they are first imported: run again with it set.
        env = dict(os.environ, TRITON_INTERPRET="1")
        command = [sys.executable, "-m", "cpab.benchmark"] + (sys.argv[1:] if argv is None else list(argv))
        raise SystemExit(subprocess.run(command, env=env).returncode)
    torch.manual_seed(0)
    if args.count:
        print_counts()
        return
    run(quick=args.quick, device=args.device, batch=args.batch, interpret=args.interpret)


if __name__ == "__main__":
    main()
