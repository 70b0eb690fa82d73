"""The compiled Triton path on CUDA (skipped without a GPU): kernels equal the reference, graphed fits equal
eager fits and capture once, fits survive a pin-memory DataLoader, launches follow the tensors' device.

The kernel's own flow table differs from the reference's in the last bits (another scaling of the same
series), so the strict comparisons feed both integrators the same table; end-to-end comparisons use a
looser float32 tolerance (a table rounding can move a step's endpoint across a cell boundary)."""
import warnings

import pytest
import torch

from cpab import CPAB, fused
from cpab import fit as reference_fit
from cpab.integrate import cell_affines, flow_table, integrate_table

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


def _assert_close(value, reference, tol):
    scale = max(1.0, reference.abs().max().item())
    delta = (value - reference).abs().max().item()
    assert delta <= tol * scale, f"max |delta| {delta:.3g} > {tol:.1g} x {scale:.3g}"


def _problem(tess, batch, n, dtype, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = CPAB(tess, backend="triton").to(dtype).to("cuda")
    theta = (scale * torch.randn(batch, model.dim, generator=gen, dtype=dtype)).to("cuda")
    points = (2.4 * torch.rand(batch, n, 2, generator=gen, dtype=dtype) - 1.2).to("cuda")
    return model, theta, points


@pytest.mark.parametrize("tess, batch, n, dtype", [((4, 4), 8, 4096, torch.float32), ((6, 6), 4, 1024, torch.float64)])
def test_compiled_kernels_equal_the_reference_stage_by_stage(tess, batch, n, dtype):
    tol = TOLERANCE[dtype]
    model, theta, points = _problem(tess, batch, n, dtype)
    kernels = fused._kernels(theta.device)
    geo = fused._Geometry(model)
    basis, basis_t = fused._bases(model, dtype, theta.device)
    affines, table = fused._tables(geo, kernels, theta, basis, basis_t)
    # 1. affines and flow table
    reference_affines = cell_affines(theta, model.basis, model.n_cells)
    _assert_close(affines.view_as(reference_affines), reference_affines, tol)
    shaped = table.view(batch, model.n_cells, model.refine + 1, 2, 3)
    _assert_close(shaped, flow_table(affines.view_as(reference_affines), model.steps, model.refine), tol)
    # 2. points forward and the table / affine gradients of the adjoint, on the kernel's table
    leaf_table = shaped.clone().requires_grad_()
    leaf_affines = affines.view_as(reference_affines).clone().requires_grad_()
    leaf_points = points.clone().requires_grad_()
    reference = integrate_table(leaf_points, leaf_table, leaf_affines, model.nx, model.ny, model.steps, model.refine,
                                model.max_crossings)
    cotangent = torch.randn_like(reference)
    ref_grads = torch.autograd.grad((reference * cotangent).sum(), (leaf_points, leaf_table, leaf_affines))
    out = torch.empty_like(points)
    jac = points.new_empty(batch * n, 4)
    geo.points(kernels, kernels.JACOBIAN, batch * n, n, table, affines, points=points, out=out, jac=jac)
    _assert_close(out, reference.detach(), tol)
    grad = points.new_zeros(batch, geo.row)
    gpoints = torch.empty_like(points)
    geo.points(kernels, kernels.ADJOINT, batch * n, n, table, affines, points=points, jac=jac, aux=cotangent,
               aux_strides=tuple(cotangent.stride()), grad=grad, gpoints=gpoints)
    rows = grad.view(batch, model.n_cells, model.refine + 2, 6)
    _assert_close(gpoints, ref_grads[0], tol)
    _assert_close(rows[:, :, :-1], ref_grads[1].reshape(batch, model.n_cells, model.refine + 1, 6), tol)
    _assert_close(rows[:, :, -1], ref_grads[2].reshape(batch, model.n_cells, 6), tol)
    # 3. cells adjoint: table / affine cotangents -> d theta, against autograd through the reference table
    leaf_theta = theta.clone().requires_grad_()
    ref_affines = cell_affines(leaf_theta, model.basis, model.n_cells)
    (ref_gtheta,) = torch.autograd.grad((flow_table(ref_affines, model.steps, model.refine) * ref_grads[1]).sum()
                                        + (ref_affines * ref_grads[2]).sum(), leaf_theta)
    gtheta = theta.new_empty(batch, model.dim)
    ga = theta.new_empty(batch, 6 * model.n_cells, dtype=torch.float64)
    geo.cells(kernels, batch, 1, gtheta, basis, basis_t, affines, table, grad=grad, ga=ga, out=gtheta,
              backward=True, update=kernels.UPDATE_WRITE, forward=False, out_stride=model.dim)
    _assert_close(gtheta, ref_gtheta, 10 * tol)
    assert grad.abs().max() == 0  # consumed and zeroed


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float64, 1e-11)])
def test_transform_grid_and_jacobian_end_to_end_equal_the_reference(dtype, tol):
    model, theta, points = _problem((4, 4), 8, 512, dtype, seed=1)
    reference = CPAB((4, 4), backend="reference").to(dtype).to("cuda")
    results = []
    for m in (model, reference):
        t, p = theta.clone().requires_grad_(), points.clone().requires_grad_()
        out = m.transform(p, t)
        grid = m.grid(t, (33, 31))
        grads = torch.autograd.grad((out * out).sum() + grid.square().sum(), (p, t))
        results.append((out.detach(), grid.detach(), *grads))
    for value, ref in zip(*results, strict=True):
        _assert_close(value, ref, tol)
    if dtype == torch.float64:
        out, jac = model.transform_jacobian(points[:2, :8], theta[:2])
        ref_out, ref_jac = reference_fit.exact_jacobian(reference, points[:2, :8], theta[:2])
        _assert_close(out, ref_out, tol)
        _assert_close(jac, ref_jac, 10 * tol)


def _keypoints(model, transforms, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = 1.6 * torch.rand(transforms, n, 2, generator=gen) - 0.8
    theta = 0.5 * torch.randn(transforms, model.dim, generator=gen)
    with torch.no_grad():
        y = CPAB((model.nx, model.ny), backend="reference").transform(x, theta)
    return x.to("cuda"), y.to("cuda")


def test_graphed_adam_fit_equals_the_eager_and_the_reference_fit_and_captures_once():
    model = CPAB((4, 4), backend="triton").to("cuda")
    x, y = _keypoints(model, 80, 5)
    first = model.fit(x, y, iterations=20)  # eager run (compiles), then the capture
    cache = fused.graph_cache(model)
    assert cache.captures == 1
    replayed = [model.fit(x, y, iterations=20) for _ in range(3)]
    assert cache.captures == 1 and len(cache) == 1
    for theta in replayed:
        _assert_close(theta, first, 1e-6)
    x2, y2 = _keypoints(model, 80, 5, seed=1)
    other = model.fit(x2, y2, iterations=20)  # same key, new inputs: replayed from the static buffers
    assert cache.captures == 1 and (other - first).abs().max() > 1e-3
    workspace = fused._adam_workspace(model, x2, 20, 1e-2, 1e-6)
    workspace["x"].copy_(x2)
    workspace["y"].copy_(y2)
    fused._adam_program(model, workspace, 20, "batch_norm")  # the same program, eagerly
    _assert_close(other, workspace["theta"], 1e-6)
    reference = CPAB((4, 4), backend="reference").to("cuda").fit(x2, y2, iterations=20)
    _assert_close(other, reference, 1e-4)
    model.fit(x2[:40], y2[:40], iterations=20)  # another shape: a second graph
    assert cache.captures == 2


def test_gauss_newton_fit_graphed_or_eager_equals_the_reference():
    model = CPAB((4, 4), backend="triton").double().to("cuda")
    x, y = _keypoints(model, 8, 5)
    x, y = x.double(), y.double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the solver may not be capturable: eager fallback
        first = model.fit(x, y, method="gauss_newton", iterations=4)
        again = model.fit(x, y, method="gauss_newton", iterations=4)
    _assert_close(again, first, 1e-12)
    reference = reference_fit.fit_gauss_newton(CPAB((4, 4), backend="reference").double().to("cuda"), x, y, 4, 1e-4,
                                               jacobian=reference_fit.exact_jacobian)
    _assert_close(first, reference, 1e-9)


class _Images(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, index):
        return torch.full((3, 64, 64), float(index))


def test_fits_while_a_pin_memory_dataloader_iterates():
    # Captures happen while the DataLoader's pin-memory thread allocates pinned host memory: thread-local
    # capture mode keeps them apart (the global mode fails the capture or the run).
    model = CPAB((4, 4), backend="triton").to("cuda")
    loader = torch.utils.data.DataLoader(_Images(), batch_size=4, pin_memory=True, num_workers=2)
    fits = []
    for step, batch in enumerate(loader):
        batch = batch.to("cuda", non_blocking=True)
        transforms = 8 + (step % 6)  # new shapes keep capturing while batches arrive
        x, y = _keypoints(model, transforms, 5, seed=step)
        theta = model.fit(x, y, iterations=10)
        fits.append((x, y, theta))
        assert torch.isfinite(theta).all() and batch.shape == (4, 3, 64, 64)
    torch.cuda.synchronize()
    assert fused.graph_cache(model).captures >= 6
    reference = CPAB((4, 4), backend="reference").to("cuda")
    for x, y, theta in fits[:3]:
        _assert_close(theta, reference.fit(x, y, iterations=10), 1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launches_and_captures_follow_the_tensors_device():
    model = CPAB((4, 4), backend="triton")
    x, y = _keypoints(model, 16, 5)
    on_first = model.to("cuda:0").fit(x.to("cuda:0"), y.to("cuda:0"), iterations=10)
    second = CPAB((4, 4), backend="triton").to("cuda:1")
    with torch.cuda.device(0):  # the current device is not the tensors'
        on_second = second.fit(x.to("cuda:1"), y.to("cuda:1"), iterations=10)
        grid = second.grid(on_second, (16, 16))
    assert on_second.device == torch.device("cuda", 1) and grid.device == torch.device("cuda", 1)
    _assert_close(on_second.cpu(), on_first.cpu(), 1e-6)


def test_auto_backend_is_the_triton_path_on_cuda():
    assert fused.resolve_backend("auto", torch.device("cuda")) == "triton"
    auto = CPAB((4, 4)).to("cuda")
    x, y = _keypoints(auto, 4, 5)
    auto.fit(x, y, iterations=2)
    assert fused.graph_cache(auto).captures == 1
