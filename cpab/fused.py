"""The Triton backend of `cpab.CPAB`: transforms, grids, Jacobians and whole fits in a few kernel launches.

One code path for CUDA and CPU: the kernels of `cpab.kernels` are compiled on CUDA tensors and run by
Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 set before cpab's kernels are first used, see
cpab/README.md), so what the CPU tests check and count is what runs on the GPU. Nothing here
synchronises with the host. Launches (and graph captures) run on the tensors' device.

Launches per call (aten operators that run a kernel + Triton launches, `python -m cpab.benchmark --count`):
- `transform` / `grid` forward: 2 (cells: affines and flow table; points); backward: 3 (zero the
  gradient rows; points adjoint; cells adjoint -> d theta);
- `transform_jacobian`: 4 (cells; zero rows; points, 2 N rows per transform; cells adjoint per row);
- `fit_adam`: 3 to start (constants in, gradient rows zeroed, the first table), then 2 per iteration
  (points: residuals, |r|^2, table gradient; cells: adjoint, Adam update, next flow table); on CUDA the
  whole fit replays from one CUDA graph;
- `fit_gauss_newton`: 14 to start (the closed form and its evaluation), then 6 per iteration (linear
  solve; cells: candidate and its table; points rows; cells rows -> [J | r]; one bmm -> [J | r]^T [J | r];
  the Levenberg-Marquardt kernel).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import weakref

import torch

from . import counting
from .graphs import GraphCache

HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = ("auto", "reference", "triton")
POINT_BLOCK, POINT_WARPS = 128, 4  # dense point sets (grids, transforms)
FIT_BLOCK, FIT_WARPS = 32, 1       # keypoint fits: few points per transform, one warp per block
LM_WARPS = 4
GRAPH_CACHE_SIZE = 8               # captured fits kept per CPAB module
_DAMPING_FLOOR = 1e-3              # cpab.fit.fit_gauss_newton's mu floor factor (scale of J^T J)
_caches: weakref.WeakKeyDictionary[torch.nn.Module, dict] = weakref.WeakKeyDictionary()


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend ("reference" or "triton") that `backend` ("auto"|"reference"|"triton") means on device."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if (HAS_TRITON and torch.device(device).type == "cuda") else "reference"
    return backend


def interpreter_available() -> bool:
    """Whether the Triton kernels run on CPU tensors in this process: triton is installed and the
    interpreter is on (TRITON_INTERPRET=1 when `cpab.kernels` is first imported, which fixes it)."""
    if not HAS_TRITON:
        return False
    if "cpab.kernels" in sys.modules:
        return sys.modules["cpab.kernels"].INTERPRETED
    import triton  # function-local: triton is optional

    if hasattr(triton, "knobs"):
        return bool(triton.knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off")


def _kernels(device: torch.device):
    """`cpab.kernels`, imported on first use (it imports triton, an optional dependency)."""
    if not HAS_TRITON:
        raise RuntimeError("the 'triton' backend needs the triton package, which is not installed")
    from . import kernels  # function-local: triton is optional and slow to import

    if device.type != "cuda" and not kernels.INTERPRETED:
        raise RuntimeError("the Triton backend on CPU tensors needs the Triton interpreter: set "
                           "TRITON_INTERPRET=1 before cpab's kernels are first used (see cpab/README.md)")
    return kernels


def _on_device(tensor: torch.Tensor):
    """Launches (and captures) on the tensor's device, whatever the current device is."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _launch(name: str, kernel, grid, *args, **meta) -> None:
    with counting.launch(name):
        kernel[grid](*args, **meta)


def _store(model) -> dict:
    return _caches.setdefault(model, {"bases": {}, "graphs": GraphCache(GRAPH_CACHE_SIZE)})


def graph_cache(model) -> GraphCache:
    """The CUDA-graph cache of a CPAB module (captured fits, their static buffers)."""
    return _store(model)["graphs"]


def _bases(model, dtype: torch.dtype, device: torch.device):
    """(basis (6 nC, d), basis^T (d, 6 nC)), contiguous in dtype on device, cached on the module."""
    bases = _store(model)["bases"]
    hit = bases.get((dtype, device))
    if hit is None or hit[0] is not model.basis:
        with torch.inference_mode(False), torch.no_grad():
            basis = model.basis.detach().to(device=device, dtype=dtype).contiguous()
            hit = (model.basis, basis, basis.t().contiguous())
        bases[(dtype, device)] = hit
    return hit[1], hit[2]


def _settings_key(model, like: torch.Tensor) -> tuple:
    """What a captured fit depends on besides its arguments: the integrator settings and the basis tensors
    (a new basis, e.g. after `model.to(...)`, is a new key; the workspace keeps the old one alive)."""
    basis, basis_t = _bases(model, like.dtype, like.device)
    return model.steps, model.refine, model.max_crossings, basis.data_ptr(), basis_t.data_ptr()


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# The kernel specialisations the launches below use (checked at every launch, so `specialisations`, the
# compile check's list, cannot miss one). Points: (MODE, GRID, GRAD_POINTS, HAS_Y); cells: (BACKWARD,
# UPDATE, FORWARD); lm: MODE. Modes and codes are those of `cpab.kernels`.
POINT_VARIANTS = ((0, False, False, False), (0, True, False, False), (1, False, False, False),
                  (1, True, False, False), (2, False, False, False), (2, False, True, False),
                  (2, True, False, False), (3, False, False, False), (4, False, False, False),
                  (4, False, False, True))
CELL_VARIANTS = ((False, 0, True), (True, 1, False), (False, 4, True), (True, 2, True), (False, 3, True))
LM_VARIANTS = (0, 1, 2)
F64_POINTERS = {"points": ("sumsq_ptr",), "cells": ("ga_ptr", "sumsq_ptr", "hyper_ptr", "steps_ptr"),
                "lm": ("hyper_ptr",)}
_dummies: dict = {}


def _dummy(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A one-element tensor for pointer arguments a launch does not use (cached: none is made in a capture)."""
    key = (device, dtype)
    if key not in _dummies:
        with torch.inference_mode(False):
            _dummies[key] = torch.zeros(1, dtype=dtype, device=device)
    return _dummies[key]


def _point_launch(mode: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of a points launch: fits and Jacobian rows have few points per transform."""
    return (FIT_BLOCK, FIT_WARPS) if mode in (3, 4) else (POINT_BLOCK, POINT_WARPS)


def _cell_launch(n_cells: int, dim: int) -> dict:
    """Block sizes and num_warps of a cells launch for a tessellation with n_cells cells and dim parameters."""
    block_j = _next_pow2(6 * n_cells)
    return dict(BLOCK_C=_next_pow2(n_cells), BLOCK_D=_next_pow2(dim), BLOCK_J=block_j,
                num_warps=8 if block_j >= 1024 else 4)


class _Geometry:
    """A module's integrator settings and the kernel arguments they give."""

    def __init__(self, model):
        self.model = model
        self.nx, self.ny = model.nx, model.ny
        self.n_cells, self.dim = model.n_cells, model.dim
        self.refine, self.max_crossings = model.refine, model.max_crossings
        self.ticks = model.steps * 2 ** model.refine
        self.row = self.n_cells * (self.refine + 2) * 6  # one gradient row (table levels + affines)
        self.cell_meta = _cell_launch(self.n_cells, self.dim)
        self.block_d = self.cell_meta["BLOCK_D"]

    def cells(self, kernels, rows, rows_per_b, theta, basis, basis_t, affines, table, *, grad=None, ga=None,
              out=None, m=None, v=None, sumsq=None, hyper=None, steps=None, delta=None, backward=False,
              update=0, forward=True, loss=0, step=0, sumsq_slot=0, out_stride=0):
        if (backward, update, forward) not in CELL_VARIANTS:
            raise RuntimeError(f"unlisted cells kernel specialisation {(backward, update, forward)}")
        same, f64 = _dummy(theta.device, theta.dtype), _dummy(theta.device, torch.float64)
        _launch("cells", kernels._cells_kernel, (rows,),
                theta, basis, basis_t, affines, table,
                same if grad is None else grad, f64 if ga is None else ga, same if out is None else out,
                same if m is None else m, same if v is None else v, f64 if sumsq is None else sumsq,
                f64 if hyper is None else hyper, f64 if steps is None else steps,
                same if delta is None else delta,
                self.dim, self.n_cells, self.ticks, rows_per_b, self.row, out_stride, step, sumsq_slot,
                self.refine, loss, BACKWARD=backward, UPDATE=update, FORWARD=forward, **self.cell_meta)

    def points(self, kernels, mode, n_points, points_per_batch, table, affines, *, points=None, out=None, jac=None,
               aux=None, aux_strides=(0, 0, 0), grad=None, gpoints=None, sumsq=None, aug=None, size=None,
               loss=0, sumsq_slot=0):
        variant = (mode, size is not None, gpoints is not None, aug is not None)
        if variant not in POINT_VARIANTS:
            raise RuntimeError(f"unlisted points kernel specialisation {variant}")
        same, f64 = _dummy(table.device, table.dtype), _dummy(table.device, torch.float64)
        height, width = size if size is not None else (1, 1)
        block, warps = _point_launch(mode)
        _launch("points", kernels._points_kernel, ((n_points + block - 1) // block,),
                same if points is None else points, table, affines, same if out is None else out,
                same if jac is None else jac, same if aux is None else aux, same if grad is None else grad,
                same if gpoints is None else gpoints, f64 if sumsq is None else sumsq,
                same if aug is None else aug,
                n_points, points_per_batch, self.n_cells, self.nx, 0.5 * self.nx, 0.5 * self.ny,
                float(self.nx - 1), float(self.ny - 1), self.ticks, self.max_crossings,
                torch.finfo(table.dtype).eps ** 2, self.row, width, height, *aux_strides,
                0 if aug is None else aug.shape[-1], sumsq_slot, self.refine, loss,
                MODE=mode, GRID=variant[1], GRAD_POINTS=variant[2], HAS_Y=variant[3], BLOCK=block,
                num_warps=warps, enable_fp_fusion=False)


def specialisations(models) -> list[tuple[str, str, dict, int]]:
    """Every kernel specialisation this module launches for CPAB modules like `models` (their
    tessellation sizes), in both dtypes: (kernel name, dtype "fp32"/"fp64", constexprs, num_warps).
    Pointer arguments are of that dtype except those in F64_POINTERS; integers i32, floats fp32."""
    result = []
    for dtype in ("fp32", "fp64"):
        for mode, grid, grad_points, has_y in POINT_VARIANTS:
            block, warps = _point_launch(mode)
            result.append(("_points_kernel", dtype, dict(MODE=mode, GRID=grid, GRAD_POINTS=grad_points,
                                                         HAS_Y=has_y, BLOCK=block), warps))
        cell_blocks, lm_blocks = {}, set()
        for model in models:
            meta = _cell_launch(model.n_cells, model.dim)
            cell_blocks[(meta["BLOCK_C"], meta["BLOCK_D"], meta["BLOCK_J"])] = meta["num_warps"]
            lm_blocks.add(meta["BLOCK_D"])
        for (block_c, block_d, block_j), warps in cell_blocks.items():
            for backward, update, forward in CELL_VARIANTS:
                result.append(("_cells_kernel", dtype, dict(BACKWARD=backward, UPDATE=update, FORWARD=forward,
                                                            BLOCK_C=block_c, BLOCK_D=block_d, BLOCK_J=block_j), warps))
        for block_d in sorted(lm_blocks):
            for mode in LM_VARIANTS:
                result.append(("_lm_kernel", dtype, dict(MODE=mode, BLOCK_D=block_d), LM_WARPS))
    return result


def _tables(geo: _Geometry, kernels, theta, basis, basis_t):
    """(affines (B, nC, 6), flow table (B, nC, refine + 1, 6)) of theta: one launch."""
    B = theta.shape[0]
    affines = theta.new_empty(B, geo.n_cells, 6)
    table = theta.new_empty(B, geo.n_cells, geo.refine + 1, 6)
    geo.cells(kernels, B, 1, theta, basis, basis_t, affines, table)
    return affines, table


class _Warp(torch.autograd.Function):
    """transform(points, theta) (points given) or grid(theta, size) (points None) through the kernels."""

    @staticmethod
    def forward(ctx, theta, points, model, size):
        geo = _Geometry(model)
        kernels = _kernels(theta.device)
        basis, basis_t = _bases(model, theta.dtype, theta.device)
        theta = theta.detach().contiguous()
        B = theta.shape[0]
        n = points.shape[1] if points is not None else size[0] * size[1]
        points = points.detach().contiguous() if points is not None else None
        affines, table = _tables(geo, kernels, theta, basis, basis_t)
        needs_grad = ctx.needs_input_grad[0] or (points is not None and ctx.needs_input_grad[1])
        out = theta.new_empty(B, n, 2)
        jac = theta.new_empty(B * n, 4) if needs_grad else None
        geo.points(kernels, kernels.JACOBIAN if needs_grad else kernels.FORWARD, B * n, n, table, affines,
                   points=points, out=out, jac=jac, size=None if points is not None else size)
        if needs_grad:
            ctx.save_for_backward(*(t for t in (affines, table, jac, points) if t is not None))
        ctx.model, ctx.size, ctx.has_points = model, size, points is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        affines, table, jac = saved[:3]
        points = saved[3] if ctx.has_points else None
        geo = _Geometry(ctx.model)
        kernels = _kernels(affines.device)
        basis, basis_t = _bases(ctx.model, affines.dtype, affines.device)
        B, n = grad_out.shape[0], jac.shape[0] // max(grad_out.shape[0], 1)
        with _on_device(affines):
            g = grad_out.to(affines.dtype).reshape(B, n, 2)
            if not ctx.needs_input_grad[0]:  # only the points' gradient: J^T g from the stored J, no sweep
                j = jac.view(B, n, 4)
                gpoints = torch.stack([j[..., 0] * g[..., 0] + j[..., 2] * g[..., 1],
                                       j[..., 1] * g[..., 0] + j[..., 3] * g[..., 1]], dim=-1)
                return None, gpoints, None, None
            grad = affines.new_zeros(B, geo.row)
            gpoints = affines.new_empty(B, n, 2) if ctx.has_points and ctx.needs_input_grad[1] else None
            geo.points(kernels, kernels.ADJOINT, B * n, n, table, affines, points=points, jac=jac, aux=g,
                       aux_strides=tuple(g.stride()), grad=grad, gpoints=gpoints,
                       size=None if ctx.has_points else ctx.size)
            gtheta = affines.new_empty(B, geo.dim)
            ga = affines.new_empty(B, 6 * geo.n_cells, dtype=torch.float64)
            geo.cells(kernels, B, 1, gtheta, basis, basis_t, affines, table, grad=grad, ga=ga, out=gtheta,
                      backward=True, update=kernels.UPDATE_WRITE, forward=False, out_stride=geo.dim)
        return (gtheta if ctx.needs_input_grad[0] else None), gpoints, None, None


def _check_dtype(*tensors: torch.Tensor) -> None:
    if tensors[0].dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the Triton backend supports float32 and float64, got {tensors[0].dtype}")


def transform(model, points: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """`CPAB.transform` through the kernels: (B, N, 2), differentiable once in points and theta."""
    _check_dtype(points, theta)
    with _on_device(theta):
        return _Warp.apply(theta, points, model, None)


def grid(model, theta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`CPAB.grid` through the kernels: the identity grid is generated in the kernel. (B, H, W, 2)."""
    _check_dtype(theta)
    with _on_device(theta):
        return _Warp.apply(theta, None, model, tuple(size)).view(theta.shape[0], size[0], size[1], 2)


def transform_jacobian(model, points: torch.Tensor, theta: torch.Tensor):
    """(transform(points, theta) (B, N, 2), d transform / d theta (B, N, 2, d)): the exact Jacobian of the
    discrete integrator, all 2 N rows of every transform from one adjoint launch. Detached."""
    _check_dtype(points, theta)
    geo = _Geometry(model)
    kernels = _kernels(theta.device)
    B, N = points.shape[:2]
    with _on_device(theta), torch.no_grad():
        basis, basis_t = _bases(model, theta.dtype, theta.device)
        theta, points = theta.detach().contiguous(), points.detach().contiguous()
        affines, table = _tables(geo, kernels, theta, basis, basis_t)
        rows = B * 2 * N
        grad = theta.new_zeros(rows, geo.row)
        out = theta.new_empty(B, N, 2)
        geo.points(kernels, kernels.ROWS, B * N, N, table, affines, points=points, out=out, grad=grad)
        jac = theta.new_empty(rows, geo.dim)
        ga = theta.new_empty(rows, 6 * geo.n_cells, dtype=torch.float64)
        geo.cells(kernels, rows, 2 * N, theta, basis, basis_t, affines, table, grad=grad, ga=ga, out=jac,
                  backward=True, update=kernels.UPDATE_WRITE, forward=False, out_stride=geo.dim)
    return out, jac.view(B, N, 2, geo.dim)


# ------------------------------------------------------------------------------------------ Adam
ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, as the official fit uses them
ADAM_EPS = 1e-8
LOSSES = ("batch_norm", "least_squares")


def _adam_workspace(model, x, iterations, lr, theta_init):
    geo = _Geometry(model)
    B, N = x.shape[:2]
    beta1, beta2 = ADAM_BETAS
    constants = []
    for t in range(1, iterations + 1):  # torch.optim.Adam's step constants, in Python floats as it has them
        constants += [lr / (1 - beta1 ** t), (1 - beta2 ** t) ** 0.5]
    host = torch.tensor([beta1, beta2, ADAM_EPS, float(theta_init), 1 - beta1, 1 - beta2] + constants,
                        dtype=torch.float64)
    constants_dev = torch.empty(host.shape, dtype=torch.float64, device=x.device)
    constants_dev.copy_(host)
    return {
        "x": torch.empty_like(x), "y": torch.empty_like(x),
        "theta": x.new_empty(B, geo.dim), "m": x.new_empty(B, geo.dim), "v": x.new_empty(B, geo.dim),
        "affines": x.new_empty(B, geo.n_cells, 6), "table": x.new_empty(B, geo.n_cells, geo.refine + 1, 6),
        "grad": x.new_zeros(B, geo.row), "ga": x.new_empty(B, 6 * geo.n_cells, dtype=torch.float64),
        "sumsq": x.new_empty(2, dtype=torch.float64), "hyper": constants_dev[:6], "steps": constants_dev[6:],
        "bases": _bases(model, x.dtype, x.device),
    }


def _adam_program(model, workspace, iterations, loss):
    """The whole fit: start, then per iteration one points launch and one cells launch."""
    geo = _Geometry(model)
    kernels = _kernels(workspace["x"].device)
    w = workspace
    B, N = w["x"].shape[:2]
    basis, basis_t = w["bases"]
    loss_code = LOSSES.index(loss)
    geo.cells(kernels, B, 1, w["theta"], basis, basis_t, w["affines"], w["table"], m=w["m"], v=w["v"],
              sumsq=w["sumsq"], hyper=w["hyper"], update=kernels.UPDATE_ADAM_INIT, forward=True)
    for i in range(iterations):
        geo.points(kernels, kernels.FIT, B * N, N, w["table"], w["affines"], points=w["x"], aux=w["y"],
                   grad=w["grad"], sumsq=w["sumsq"], loss=loss_code, sumsq_slot=i % 2)
        geo.cells(kernels, B, 1, w["theta"], basis, basis_t, w["affines"], w["table"], grad=w["grad"], ga=w["ga"],
                  m=w["m"], v=w["v"], sumsq=w["sumsq"], hyper=w["hyper"], steps=w["steps"], backward=True,
                  update=kernels.UPDATE_ADAM, forward=True, loss=loss_code, step=i,
                  sumsq_slot=i % 2)


def _run_fit(model, key, x, y, make, program):
    """theta of a fit `program` run on the workspace `make()` builds: on CUDA replayed from the graph
    cached under `key` plus the module's settings (captured on first use), elsewhere eagerly."""
    if x.is_cuda:
        workspace = graph_cache(model).run((*key, *_settings_key(model, x)), x.device, make, program,
                                           {"x": x, "y": y})
        return workspace["theta"].clone()
    workspace = make()
    workspace["x"], workspace["y"] = x, y
    program(workspace)
    return workspace["theta"]


def fit_adam(model, x: torch.Tensor, y: torch.Tensor, iterations: int, lr: float, theta_init: float,
             loss: str) -> torch.Tensor:
    """`cpab.fit.fit_adam` (the same start, loss and torch.optim.Adam arithmetic) in 2 launches per iteration;
    on CUDA replayed from a CUDA graph captured once per (shape, dtype, device, iterations, lr, theta_init,
    loss) and module. Returns theta (B, d), detached."""
    _check_dtype(x, y)
    with _on_device(x), torch.inference_mode(False), torch.no_grad():
        x, y = x.detach().contiguous(), y.detach().contiguous()
        if iterations == 0 or x.shape[0] == 0:
            return torch.full((x.shape[0], model.dim), float(theta_init), dtype=x.dtype, device=x.device)

        def make():
            return _adam_workspace(model, x, iterations, lr, theta_init)

        def program(workspace):
            _adam_program(model, workspace, iterations, loss)

        key = ("adam", tuple(x.shape), x.dtype, x.device, iterations, float(lr), float(theta_init), loss)
        return _run_fit(model, key, x, y, make, program)


# ------------------------------------------------------------------------------------------ Gauss-Newton
def _gn_workspace(model, x, damping):
    geo = _Geometry(model)
    B, N = x.shape[:2]
    d, rows = geo.dim, B * 2 * x.shape[1]
    host = torch.tensor([float(damping), _DAMPING_FLOOR], dtype=torch.float64)
    hyper = torch.empty(host.shape, dtype=torch.float64, device=x.device)
    hyper.copy_(host)
    return {
        "x": torch.empty_like(x), "y": torch.empty_like(x), "zeros": x.new_zeros(B, d),
        "theta": x.new_empty(B, d), "candidate": x.new_empty(B, d),
        "affines": x.new_empty(B, geo.n_cells, 6), "table": x.new_empty(B, geo.n_cells, geo.refine + 1, 6),
        "grad": x.new_zeros(rows, geo.row), "ga": x.new_empty(rows, 6 * geo.n_cells, dtype=torch.float64),
        "out": x.new_empty(B, N, 2), "aug": x.new_empty(B, 2 * N, d + 1), "normal": x.new_empty(B, d + 1, d + 1),
        "state": x.new_empty(B, d + 1, d + 1), "objective": x.new_empty(B), "mu": x.new_empty(B),
        "scale": x.new_empty(2, B), "system": x.new_empty(B, d, d), "rhs": x.new_empty(B, d, 1), "hyper": hyper,
        "bases": _bases(model, x.dtype, x.device),
    }


def _gn_evaluate(geo, kernels, w, basis, basis_t, delta):
    """[J | r]^T [J | r] into w["normal"] at theta + delta (delta None: at 0): 4 launches."""
    B, N = w["x"].shape[:2]
    if delta is None:
        geo.cells(kernels, B, 1, w["zeros"], basis, basis_t, w["affines"], w["table"])
    else:
        geo.cells(kernels, B, 1, w["theta"], basis, basis_t, w["affines"], w["table"], out=w["candidate"],
                  delta=delta, update=kernels.UPDATE_CANDIDATE)
    geo.points(kernels, kernels.ROWS, B * N, N, w["table"], w["affines"], points=w["x"], out=w["out"],
               aux=w["y"], grad=w["grad"], aug=w["aug"])
    geo.cells(kernels, B * 2 * N, 2 * N, w["theta"], basis, basis_t, w["affines"], w["table"], grad=w["grad"],
              ga=w["ga"], out=w["aug"], backward=True, update=kernels.UPDATE_WRITE, forward=False,
              out_stride=geo.dim + 1)
    torch.bmm(w["aug"].transpose(1, 2), w["aug"], out=w["normal"])


def _gn_program(model, workspace, iterations):
    geo = _Geometry(model)
    w = workspace
    kernels = _kernels(w["x"].device)
    B = w["x"].shape[0]
    basis, basis_t = w["bases"]

    def lm(mode, slot):
        _launch("lm", kernels._lm_kernel, (B,), w["normal"], w["state"], w["theta"],
                w["zeros"] if mode == kernels.LM_START else w["candidate"], w["objective"], w["mu"], w["scale"],
                w["system"], w["rhs"], w["hyper"], B, geo.dim, slot, MODE=mode, BLOCK_D=geo.block_d,
                num_warps=LM_WARPS, enable_fp_fusion=False)

    def solve():
        solution, _ = torch.linalg.solve_ex(w["system"], w["rhs"], check_errors=False)
        return solution

    _gn_evaluate(geo, kernels, w, basis, basis_t, None)   # at theta = 0, J = G(x), r = x - y
    lm(kernels.LM_START, 0)                                # closed form: (G^T G + damping I) theta = G^T (y - x)
    _gn_evaluate(geo, kernels, w, basis, basis_t, solve())
    lm(kernels.LM_ACCEPT, 1)
    for i in range(iterations):
        _gn_evaluate(geo, kernels, w, basis, basis_t, solve())
        lm(kernels.LM_STEP, i % 2)


def fit_gauss_newton(model, x: torch.Tensor, y: torch.Tensor, iterations: int, damping: float) -> torch.Tensor:
    """`cpab.fit.fit_gauss_newton` (the same closed-form start, Levenberg-Marquardt arithmetic and
    decisions, with the exact Jacobian of the discrete integrator) in 6 launches per iteration; on CUDA
    replayed from a CUDA graph (or eagerly where its linear solve cannot be captured). Returns theta (B, d)."""
    _check_dtype(x, y)
    with _on_device(x), torch.inference_mode(False), torch.no_grad():
        x, y = x.detach().contiguous(), y.detach().contiguous()
        if x.shape[0] == 0:
            return x.new_zeros(0, model.dim)

        def make():
            return _gn_workspace(model, x, damping)

        def program(workspace):
            _gn_program(model, workspace, iterations)

        key = ("gauss_newton", tuple(x.shape), x.dtype, x.device, iterations, float(damping))
        return _run_fit(model, key, x, y, make, program)
