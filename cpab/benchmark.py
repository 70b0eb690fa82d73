"""`python -m cpab.benchmark`: CPAB fit and dense-warp timings, fast path (Triton) vs PyTorch reference.

Prints in one run, at the CPABMM shapes for batch size 8 (`--batch`; 2 by default on CPU):
- fit time per method (adam: `CPAB.fit(method="adam")`; adam_graph: the same fit replayed from a CUDA
  graph, `cpab.kernels.adam_fit_cuda_graph`, whose reference column is the eager adam fit;
  gauss_newton: `CPAB.fit(method="gauss_newton")`) for the 10 partial warps per sample (5 keypoints each,
  4 x 4 tessellation, 100 iterations: 80 transforms) and the global warp (50 keypoints, 6 x 6,
  150 iterations: 8 transforms), with the mean keypoint residual |T(x) - y| before and after;
- dense-grid warp time of those 88 transforms at 64^2 and 256^2, forward and forward+backward (w.r.t.
  theta);
each for the fast path (the Triton kernel, backend "triton") and the reference (backend "reference",
on the same device), and their ratio, with the device named.
Keypoints: x uniform in [-0.9, 0.9]^2, y = T_theta*(x) for a random theta* (scale `THETA_SCALE`), fixed seed.
Times are the median of 5 runs after one warm-up run (which compiles the kernels), with CUDA synchronised
around each run; on CPU one run, no warm-up.
Without CUDA the sizes are reduced (fewer iterations, smaller grids; said in the header) and the fast
path is not timed unless `--interpret` is given (the Triton interpreter checks correctness, it is not
fast). `--quick` is the CI smoke test: tiny sizes.
"""
import argparse
import os
import statistics
import sys
import time

import torch

if __name__ == "__main__" and not torch.cuda.is_available() and "--interpret" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

from . import kernels  # noqa: E402
from .transform import CPAB  # noqa: E402

THETA_SCALE = 0.5
METHODS = ("adam", "adam_graph", "gauss_newton")
GN_ITERATIONS = 5


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


def fit(model, method, x, y, iterations, fast):
    """theta of one fit by `method` (see the module docstring)."""
    if method == "adam_graph":
        if fast:
            return kernels.adam_fit_cuda_graph(model, x, y, iterations=iterations, lr=1e-2, theta_init=1e-6)
        method = "adam"
    return model.fit(x, y, method=method, iterations=iterations)


def residual(model, x, y, theta):
    """Mean keypoint distance |T_theta(x) - y| in [-1, 1] units."""
    with torch.no_grad():
        return (model.transform(x, theta) - y).norm(dim=-1).mean().item()


def fmt_ms(value):
    return f"{value:10.2f} ms" if value is not None else "       n/a   "


def fmt_ratio(fast, reference):
    return f"x{reference / fast:8.3g}" if fast and reference else "      n/a"


def run(quick=False, device=None, batch=None, interpret=False, out=print):
    """Runs the benchmark and prints every row with `out`; returns the rows (strings)."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.type == "cuda"
    size = sizes(quick, on_cuda, batch)
    fast_ok = kernels.HAS_TRITON and (on_cuda or (interpret and kernels.interpreter_available()))
    if on_cuda:
        fast_note = "Triton kernel"
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
                if method == "adam_graph" and not fast_ok:
                    continue  # without a fast path this row would repeat the adam row
                model = CPAB(tess, backend=backend).to(device)
                try:
                    times[label], theta = timed(lambda: fit(model, method, x, y, iters, label == "fast"),
                                                device, size["repeats"])
                except NotImplementedError:
                    times[label], after[label] = None, None
                    continue
                after[label] = residual(model, x, y, theta)
            res = " ".join(f"{label} {after[label]:.4f}" if after.get(label) is not None else f"{label} n/a"
                           for label, _ in backends)
            emit(f"fit  {method:12s} {name:7s} {transforms:3d}x({n_kps:2d} kps, {tess[0]}x{tess[1]}, {iters:3d} it) "
                 f"fast {fmt_ms(times.get('fast'))} ref {fmt_ms(times.get('ref'))} "
                 f"{fmt_ratio(times.get('fast'), times.get('ref'))} | residual {before:.4f} -> {res}")
    for side in size["grids"]:
        for mode in ("forward", "forward+backward"):
            times = {}
            for label, backend in backends:
                total = 0.0
                for name, tess, transforms, _ in groups(size["batch"]):
                    model = CPAB(tess, backend=backend).to(device)
                    theta = THETA_SCALE * torch.randn(transforms, model.dim, device=device)
                    if mode == "forward":
                        def step(model=model, theta=theta):
                            with torch.no_grad():
                                return model.grid(theta, (side, side))
                    else:
                        theta.requires_grad_(True)

                        def step(model=model, theta=theta):
                            grid = model.grid(theta, (side, side))
                            return torch.autograd.grad(grid.square().sum(), theta)[0]
                    elapsed, _ = timed(step, device, size["repeats"])
                    total += elapsed
                times[label] = total
            count = sum(g[2] for g in groups(size["batch"]))
            emit(f"warp {side:4d}x{side:<4d} {count:3d} transforms {mode:16s} fast {fmt_ms(times.get('fast'))} "
                 f"ref {fmt_ms(times.get('ref'))} {fmt_ratio(times.get('fast'), times.get('ref'))}")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke test)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size (10 partial + 1 global transforms each); default 8 on CUDA, 2 on CPU")
    parser.add_argument("--interpret", action="store_true",
                        help="without CUDA, also run the fast path through the Triton interpreter (slow)")
    args = parser.parse_args(argv)
    if args.batch is not None and args.batch < 1:
        parser.error("--batch must be positive")
    torch.manual_seed(0)
    run(quick=args.quick, device=args.device, batch=args.batch, interpret=args.interpret)


if __name__ == "__main__":
    main()
