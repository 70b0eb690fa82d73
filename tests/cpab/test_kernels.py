"""The Triton integrator (cpab.kernels) equals the reference (cpab.integrate) in value and gradient.

Without CUDA the kernel runs through the Triton interpreter on CPU tensors; the interpreter is fixed
when Triton is imported, so TRITON_INTERPRET=1 is set here before anything imports it.
"""
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cpab import CPAB  # noqa: E402
from cpab import kernels  # noqa: E402
from cpab.integrate import flow_table  # noqa: E402
from cpab.integrate import integrate_table as reference_integrate_table  # noqa: E402

needs_interpreter = pytest.mark.skipif(
    torch.cuda.is_available() or not kernels.interpreter_available(),
    reason="CUDA present (the gpu tests compare the compiled kernel), or triton missing or imported before "
           "TRITON_INTERPRET=1 could be set (run this file alone)")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _problem(tess, batch, n_points, scale, dtype, device="cpu", zero_boundary=False, seed=0):
    """Random theta and points (some outside the domain), leaves requiring grad, and the CPAB model."""
    gen = torch.Generator().manual_seed(seed)
    model = CPAB(tess, zero_boundary=zero_boundary).to(dtype)
    theta = (scale * torch.randn(batch, model.dim, generator=gen, dtype=dtype)).to(device).requires_grad_()
    points = (2.4 * torch.rand(batch, n_points, 2, generator=gen, dtype=dtype) - 1.2).to(device).requires_grad_()
    return model, theta, points


def _run(fn, model, theta, points, steps, refine, max_crossings, cotangent):
    """Output and gradients (points, theta) of <output, cotangent> through integrate_table-like fn."""
    affines = model.cell_affines(theta)
    table = flow_table(affines, steps, refine)
    out = fn(points, table, affines, model.nx, model.ny, steps, refine, max_crossings)
    grads = torch.autograd.grad((out * cotangent).sum(), (points, theta))
    return out.detach(), grads


def _assert_close(kernel, reference, tol):
    """max |delta| <= tol, relative to the reference's magnitude where that exceeds 1."""
    scale = max(1.0, reference.abs().max().item())
    delta = (kernel - reference).abs().max().item()
    assert delta <= tol * scale, f"max |delta| {delta:.3g} > {tol:.1g} x {scale:.3g}"


def _compare(tess, batch, n_points, scale, dtype, steps, refine, max_crossings, tol, device="cpu",
             zero_boundary=False):
    model, theta, points = _problem(tess, batch, n_points, scale, dtype, device, zero_boundary)
    model = model.to(device)
    cotangent = torch.randn(batch, n_points, 2, dtype=dtype).to(device)
    ref_out, ref_grads = _run(reference_integrate_table, model, theta, points, steps, refine, max_crossings,
                              cotangent)
    out, grads = _run(kernels.triton_integrate_table, model, theta, points, steps, refine, max_crossings,
                      cotangent)
    assert (ref_out - points).abs().max() > 0.05  # the points really move (and cross cells)
    _assert_close(out, ref_out, tol)
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.abs().max() > 0
        _assert_close(grad, ref_grad, tol)


@needs_interpreter
def test_float32_forward_and_gradients_equal_reference():
    _compare((4, 4), batch=2, n_points=48, scale=1.0, dtype=torch.float32, steps=4, refine=2,
             max_crossings=64, tol=1e-5)


@needs_interpreter
def test_float64_equal_reference_at_cpab_defaults_zero_boundary():
    model = CPAB((3, 3))
    _compare((3, 3), batch=1, n_points=16, scale=1.0, dtype=torch.float64, steps=model.steps,
             refine=model.refine, max_crossings=model.max_crossings, tol=1e-12, zero_boundary=True)


@needs_interpreter
def test_crossing_limit_equals_reference():
    # max_crossings=1: after its first crossing a point stops bisecting
    _compare((3, 3), batch=2, n_points=16, scale=2.0, dtype=torch.float64, steps=4, refine=2,
             max_crossings=1, tol=1e-12)


@needs_interpreter
def test_theta_only_gradient_and_no_grad_forward():
    model, theta, points = _problem((4, 4), 1, 8, 0.5, torch.float32)
    points = points.detach()
    affines = model.cell_affines(theta)
    table = flow_table(affines, 4, 2)
    out = kernels.triton_integrate_table(points, table, affines, 4, 4, 4, 2, 64)
    (grad,) = torch.autograd.grad(out.sum(), theta, retain_graph=True)
    ref = reference_integrate_table(points, table, affines, 4, 4, 4, 2, 64)
    (ref_grad,) = torch.autograd.grad(ref.sum(), theta)
    _assert_close(grad, ref_grad, 1e-5)
    with torch.no_grad():
        again = kernels.triton_integrate_table(points, table, affines, 4, 4, 4, 2, 64)
    assert not again.requires_grad
    assert torch.equal(again, out.detach())


@needs_interpreter
def test_cpab_backend_switch_and_empty_input():
    model, theta, points = _problem((4, 4), 1, 6, 1.0, torch.float32)
    fast = CPAB((4, 4), steps=4, refine=2, backend="triton")
    slow = CPAB((4, 4), steps=4, refine=2, backend="reference")
    with torch.no_grad():
        _assert_close(fast.transform(points, theta), slow.transform(points, theta), 1e-6)
        assert fast.transform(points[:, :0], theta).shape == (1, 0, 2)
    empty = kernels.integrate(points[:, :0].detach(), model.cell_affines(theta).detach(), 4, 4, 4, 2, 64,
                              backend="triton")
    assert empty.shape == (1, 0, 2)


def test_backend_resolution_and_argument_errors():
    assert kernels.resolve_backend("auto", torch.device("cpu")) == "reference"
    assert kernels.resolve_backend("reference", torch.device("cpu")) == "reference"
    assert kernels.resolve_backend("triton", torch.device("cpu")) == "triton"
    expected = "triton" if kernels.HAS_TRITON else "reference"
    assert kernels.resolve_backend("auto", torch.device("cuda")) == expected
    with pytest.raises(ValueError, match="backend"):
        kernels.resolve_backend("cuda", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend"):
        CPAB((2, 2), backend="fast")
    points = torch.zeros(1, 3, 2)
    affines = torch.zeros(1, 16, 2, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype"):
        kernels.triton_integrate_table(points, flow_table(affines, 2, 1), affines, 2, 2, 2, 1, 8)


@pytest.mark.skipif(not kernels.HAS_TRITON or torch.cuda.is_available(), reason="needs triton; GPU runs test this")
def test_kernel_compiles_for_sm90_without_a_gpu():
    """Ahead-of-time compilation of every mode to an H100 cubin, in a fresh process (no interpreter)."""
    script = (
        "import torch, triton\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        "import cpab.kernels as K\n"
        "kernel = K._kernel(torch.device('cuda'))\n"
        "ptrs = ('points_ptr', 'table_ptr', 'affines_ptr', 'out_ptr', 'jac_ptr', 'lam_ptr', 'grad_table_ptr',"
        " 'grad_affines_ptr')\n"
        "floats = ('half_nx', 'half_ny', 'max_i', 'max_j', 'eps')\n"
        "sig = {n: 'constexpr' if n.isupper() else '*fp32' if n in ptrs else '*i32' if n == 'cells_ptr'"
        " else 'fp32' if n in floats else 'i32' for n in kernel.arg_names}\n"
        "for mode in (0, 1, 2):\n"
        "    src = ASTSource(fn=kernel, signature=sig, constexprs={'REFINE': 3, 'MODE': mode, 'BLOCK': 128})\n"
        "    out = triton.compile(src, target=GPUTarget('cuda', 90, 32), options={'enable_fp_fusion': False})\n"
        "    assert len(out.asm['cubin']) > 1000 and 'fma.' not in out.asm['ptx']\n"
        "print('compiled')\n")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernel_equals_reference():
    model = CPAB((4, 4))
    _compare((4, 4), batch=8, n_points=4096, scale=1.0, dtype=torch.float32, steps=model.steps,
             refine=model.refine, max_crossings=model.max_crossings, tol=1e-5, device="cuda")
    _compare((6, 6), batch=4, n_points=1024, scale=1.0, dtype=torch.float64, steps=model.steps,
             refine=model.refine, max_crossings=model.max_crossings, tol=1e-12, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_backend_is_the_kernel_and_grid_matches():
    reference = CPAB((4, 4), backend="reference").to("cuda")
    auto = CPAB((4, 4)).to("cuda")
    theta = torch.randn(88, reference.dim, device="cuda")
    assert kernels.resolve_backend("auto", theta.device) == "triton"
    _assert_close(auto.grid(theta, (64, 64)), reference.grid(theta, (64, 64)), 1e-5)


def test_sync_free_flow_table_equals_matrix_exp_table():
    model = CPAB((4, 4)).double()
    theta = torch.randn(3, model.dim, dtype=torch.float64, requires_grad=True)
    cotangent = torch.randn(3, model.n_cells, 4, 2, 3, dtype=torch.float64)
    tables = [fn(model.cell_affines(theta), 8, 3) for fn in (flow_table, kernels.flow_table_sync_free)]
    grads = [torch.autograd.grad((table * cotangent).sum(), theta)[0] for table in tables]
    _assert_close(tables[1], tables[0], 1e-12)
    _assert_close(grads[1], grads[0], 1e-11)
    assert kernels.flow_table_sync_free(model.cell_affines(theta).float(), 8, 3).dtype == torch.float32


def test_transform_jacobian_equals_autograd_jacobian():
    model = CPAB((2, 2), steps=4, refine=2, backend="reference").double()
    theta = torch.randn(2, model.dim, dtype=torch.float64)
    points = 1.8 * torch.rand(2, 3, 2, dtype=torch.float64) - 0.9
    out, jac = kernels.transform_jacobian(model, points, theta)
    full = torch.autograd.functional.jacobian(lambda t: model.transform(points, t), theta)  # (2, 3, 2, 2, d)
    expected = torch.stack([full[b, :, :, b] for b in range(2)])
    _assert_close(out, model.transform(points, theta), 1e-12)
    _assert_close(jac, expected, 1e-10)
    assert full[0, :, :, 1].abs().max() == 0 and jac.abs().max() > 0.1


def test_adam_fit_cuda_graph_equals_faithful_adam_fit_eagerly_on_cpu():
    model = CPAB((2, 2), steps=2, refine=1)
    x = 1.6 * torch.rand(3, 5, 2) - 0.8
    y = model.transform(x, 0.5 * torch.randn(3, model.dim))
    theta = kernels.adam_fit_cuda_graph(model, x, y, iterations=4, lr=1e-2, theta_init=1e-6)
    assert torch.equal(theta, model.fit(x, y, method="adam", iterations=4))
    assert (theta - 1e-6).abs().max() > 1e-3


@needs_interpreter
def test_transform_jacobian_through_the_kernel_equals_reference():
    theta = torch.randn(1, CPAB((3, 3)).dim, dtype=torch.float64)
    points = 1.8 * torch.rand(1, 2, 2, dtype=torch.float64) - 0.9
    fast = kernels.transform_jacobian(CPAB((3, 3), steps=2, refine=1, backend="triton").double(), points, theta)
    slow = kernels.transform_jacobian(CPAB((3, 3), steps=2, refine=1, backend="reference").double(), points, theta)
    _assert_close(fast[0], slow[0], 1e-12)
    _assert_close(fast[1], slow[1], 1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_adam_fit_and_jacobian_match_eager():
    model = CPAB((4, 4)).to("cuda")
    x = (1.6 * torch.rand(80, 5, 2) - 0.8).to("cuda")
    y = model.transform(x, 0.5 * torch.randn(80, model.dim, device="cuda"))
    graphed = kernels.adam_fit_cuda_graph(model, x, y, iterations=20, lr=1e-2, theta_init=1e-6)
    eager = model.fit(x, y, method="adam", iterations=20)
    _assert_close(graphed, eager, 1e-4)
    out, jac = kernels.transform_jacobian(model, x[:4], graphed[:4])
    reference = CPAB((4, 4), backend="reference").to("cuda")
    ref_out, ref_jac = kernels.transform_jacobian(reference, x[:4], graphed[:4])
    _assert_close(out, ref_out, 1e-5)
    _assert_close(jac, ref_jac, 1e-4)
