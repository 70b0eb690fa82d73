"""The Triton path (cpab.fused, kernels in cpab.kernels) equals the PyTorch reference, on CPU through the
Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before anything imports triton): the
same kernels the GPU runs. Problems are tiny: the interpreter executes every operation in Python."""
import os
import re
import subprocess
import sys

import pytest
import torch

from cpab import CPAB, fused
from cpab import fit as reference_fit
from cpab.integrate import flow_table

needs_interpreter = pytest.mark.skipif(
    torch.cuda.is_available() or not fused.interpreter_available(),
    reason="CUDA present (tests/cpab/test_gpu.py compares the compiled kernels), or triton missing or its "
           "interpreter off (TRITON_INTERPRET=1 must be set before cpab's kernels are imported)")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pair(tess, dtype, **settings):
    """The same CPAB module on both backends."""
    return (CPAB(tess, backend="triton", **settings).to(dtype), CPAB(tess, backend="reference", **settings).to(dtype))


def _assert_close(value, reference, tol):
    """max |delta| <= tol, relative to the reference's magnitude where that exceeds 1."""
    scale = max(1.0, reference.abs().max().item())
    delta = (value - reference).abs().max().item()
    assert delta <= tol * scale, f"max |delta| {delta:.3g} > {tol:.1g} x {scale:.3g}"


def _compare_transform(tess, batch, n_points, scale, dtype, tol, seed=0, **settings):
    """Forward and both gradients (points, theta) of <transform, cotangent>, kernel vs reference."""
    fast, slow = _pair(tess, dtype, **settings)
    gen = torch.Generator().manual_seed(seed)
    theta = scale * torch.randn(batch, fast.dim, generator=gen, dtype=dtype)
    points = 2.4 * torch.rand(batch, n_points, 2, generator=gen, dtype=dtype) - 1.2  # some outside the domain
    cotangent = torch.randn(batch, n_points, 2, generator=gen, dtype=dtype)
    results = []
    for model in (fast, slow):
        t, p = theta.clone().requires_grad_(), points.clone().requires_grad_()
        out = model.transform(p, t)
        results.append((out.detach(), *torch.autograd.grad((out * cotangent).sum(), (p, t))))
    assert (results[1][0] - points).abs().max() > 0.05  # the points really move (and cross cells)
    for value, reference in zip(*results, strict=True):
        assert value.abs().max() > 0
        _assert_close(value, reference, tol)


@needs_interpreter
def test_float32_transform_and_gradients_equal_reference():
    _compare_transform((4, 4), batch=2, n_points=24, scale=1.0, dtype=torch.float32, tol=1e-5, steps=4, refine=2)


@needs_interpreter
def test_float64_equal_reference_at_cpab_defaults_zero_boundary():
    _compare_transform((3, 3), batch=1, n_points=12, scale=1.0, dtype=torch.float64, tol=1e-12, zero_boundary=True)


@needs_interpreter
def test_crossing_limit_and_refine_zero_equal_reference():
    # max_crossings=1: after its first crossing a point stops bisecting; refine=0: no bisection at all
    _compare_transform((3, 3), batch=2, n_points=8, scale=2.0, dtype=torch.float64, tol=1e-12, steps=4, refine=2,
                       max_crossings=1)
    _compare_transform((2, 2), batch=1, n_points=8, scale=1.0, dtype=torch.float64, tol=1e-12, steps=8, refine=0)


@needs_interpreter
def test_grid_and_its_gradient_equal_reference():
    fast, slow = _pair((2, 2), torch.float64, steps=4, refine=1)
    theta = torch.randn(2, fast.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = []
    for model in (fast, slow):
        t = theta.clone().requires_grad_()
        grid = model.grid(t, (5, 4))
        results.append((grid.detach(), torch.autograd.grad(grid.square().sum(), t)[0]))
    assert results[0][0].shape == (2, 5, 4, 2)
    for value, reference in zip(*results, strict=True):
        _assert_close(value, reference, 1e-12)
    with torch.no_grad():
        assert not fast.grid(theta, (3, 3)).requires_grad


@needs_interpreter
def test_flow_table_equals_reference_table():
    fast, _ = _pair((3, 3), torch.float64)
    theta = 2.0 * torch.randn(2, fast.dim, dtype=torch.float64)
    affines = fast.cell_affines(theta)
    kernels = fused._kernels(theta.device)
    basis, basis_t = fused._bases(fast, theta.dtype, theta.device)
    kernel_affines, table = fused._tables(fused._Geometry(fast), kernels, theta, basis, basis_t)
    _assert_close(kernel_affines.view_as(affines), affines, 1e-14)
    reference = flow_table(affines, fast.steps, fast.refine)
    assert table.shape == (2, fast.n_cells, fast.refine + 1, 6)
    _assert_close(table.view_as(reference), reference, 1e-14)


@needs_interpreter
def test_transform_jacobian_equals_exact_reference_jacobian():
    fast, slow = _pair((2, 2), torch.float64, steps=4, refine=2)
    theta = torch.randn(2, fast.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    points = 1.8 * torch.rand(2, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) - 0.9
    out, jac = fast.transform_jacobian(points, theta)
    ref_out, ref_jac = reference_fit.exact_jacobian(slow, points, theta)
    assert jac.shape == (2, 3, 2, fast.dim) and not jac.requires_grad
    _assert_close(out, ref_out, 1e-13)
    _assert_close(jac, ref_jac, 1e-12)
    assert ref_jac.abs().max() > 0.1


def _keypoints(model, batch, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (1.6 * torch.rand(batch, n, 2, generator=gen) - 0.8).to(dtype)
    theta = (0.5 * torch.randn(batch, model.dim, generator=gen)).to(dtype)
    with torch.no_grad():
        return x, CPAB((model.nx, model.ny), backend="reference").to(dtype).transform(x, theta)


@needs_interpreter
@pytest.mark.parametrize("dtype, tol, loss", [(torch.float64, 1e-12, "batch_norm"), (torch.float32, 1e-5, "batch_norm"),
                                              (torch.float64, 1e-12, "least_squares")])
def test_adam_fit_equals_reference_fit(dtype, tol, loss):
    fast, slow = _pair((2, 2), dtype, steps=4, refine=2)
    x, y = _keypoints(fast, 2, 4, dtype)
    theta = fast.fit(x, y, method="adam", iterations=4, loss=loss)
    reference = slow.fit(x, y, method="adam", iterations=4, loss=loss)
    assert theta.dtype == dtype and not theta.requires_grad
    assert (reference - 1e-6).abs().max() > 0.03  # four Adam steps of 1e-2 really moved it
    _assert_close(theta, reference, tol)


@needs_interpreter
def test_adam_fit_batch_norm_couples_the_transforms_on_the_kernel_path():
    # Faithful to the official code: one norm over the whole batch, so a transform's fit depends on the
    # others; "least_squares" fits each transform on its own.
    fast, _ = _pair((1, 1), torch.float64, steps=2, refine=1)
    x, y = _keypoints(fast, 2, 3, torch.float64)
    y_big = y.clone()
    y_big[1] = x[1] + 4 * (y[1] - x[1])
    for loss, coupled in (("batch_norm", True), ("least_squares", False)):
        together = fast.fit(x, y, iterations=2, loss=loss)
        with_big = fast.fit(x, y_big, iterations=2, loss=loss)
        assert ((with_big[0] - together[0]).abs().max() > 1e-6) == coupled, loss


@needs_interpreter
@pytest.mark.parametrize("dtype, tol, iterations", [(torch.float64, 1e-10, 2), (torch.float32, 2e-3, 1)])
def test_gauss_newton_fit_equals_reference_fit_with_the_exact_jacobian(dtype, tol, iterations):
    # float32: the damped normal equations (damping 1e-4) have condition numbers ~1e4, so the two solves'
    # roundings differ by ~1e-4; float64 shows the arithmetic is the same.
    fast, slow = _pair((1, 1), dtype, steps=4, refine=1)
    x, y = _keypoints(fast, 2, 2, dtype, seed=4)
    theta = fast.fit(x, y, method="gauss_newton", iterations=iterations)
    reference = reference_fit.fit_gauss_newton(slow, x, y, iterations=iterations, damping=1e-4,
                                               jacobian=reference_fit.exact_jacobian)
    assert reference.abs().max() > 0.05
    _assert_close(theta, reference, tol)
    if dtype == torch.float64:
        start = reference_fit.fit_gauss_newton(slow, x, y, iterations=0, damping=1e-4,
                                               jacobian=reference_fit.exact_jacobian)
        assert (start - reference).abs().max() > 1e-3  # the iterations did something
        _assert_close(fast.fit(x, y, method="gauss_newton", iterations=0), start, tol)


@needs_interpreter
def test_non_finite_theta_propagates_without_error_on_the_kernel_path():
    fast, slow = _pair((2, 2), torch.float32, steps=2, refine=1)
    theta = torch.randn(1, fast.dim)
    theta[0, 3] = float("nan")
    points = torch.rand(1, 4, 2) * 2 - 1
    assert torch.isnan(fast.transform(points, theta)).any()  # no host sync, no crash: NaN comes out
    with pytest.raises(ValueError, match="theta"):
        slow.transform(points, theta)  # the reference syncs on its scaling anyway and says why it cannot
    strict = CPAB((2, 2), backend="triton", check_finite=True)
    with pytest.raises(ValueError, match="theta"):
        strict.transform(points, theta)


@needs_interpreter
def test_fits_under_no_grad_inference_mode_and_with_an_inference_module():
    with torch.inference_mode():
        model = CPAB((1, 1), steps=2, refine=1, backend="triton")
        x, y = _keypoints(model, 1, 2, torch.float32)
        theta = model.fit(x, y, iterations=2)
        jac = model.transform_jacobian(x, theta)[1]
    assert not theta.is_inference() and torch.isfinite(theta).all() and torch.isfinite(jac).all()
    with torch.no_grad():
        assert model.fit(x, y, method="gauss_newton", iterations=1).shape == (1, model.dim)


@needs_interpreter
def test_empty_inputs_on_the_kernel_path():
    model = CPAB((2, 2), backend="triton")
    theta = torch.randn(1, model.dim)
    assert model.transform(torch.zeros(1, 0, 2), theta).shape == (1, 0, 2)
    assert model.grid(torch.zeros(0, model.dim), (3, 3)).shape == (0, 3, 3, 2)
    assert model.fit(torch.zeros(0, 3, 2), torch.zeros(0, 3, 2), iterations=2).shape == (0, model.dim)


def test_backend_resolution_and_argument_errors():
    assert fused.resolve_backend("auto", torch.device("cpu")) == "reference"
    assert fused.resolve_backend("reference", torch.device("cpu")) == "reference"
    assert fused.resolve_backend("triton", torch.device("cpu")) == "triton"
    expected = "triton" if fused.HAS_TRITON else "reference"
    assert fused.resolve_backend("auto", torch.device("cuda")) == expected
    with pytest.raises(ValueError, match="backend"):
        fused.resolve_backend("cuda", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend"):
        CPAB((2, 2), backend="fast")
    model = CPAB((2, 2), backend="triton")
    with pytest.raises(TypeError, match="float32 and float64"):
        model.transform(torch.zeros(1, 3, 2, dtype=torch.float16), torch.zeros(1, model.dim, dtype=torch.float16))


def _run(code, env_update=None, cwd=ROOT):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(env_update or {})
    env["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_import_cpab_imports_neither_triton_nor_project_code_and_writes_no_environment(tmp_path):
    # (torch.optim.Adam, which the reference Adam fit uses, imports torch._dynamo, triton and sets an
    # inductor variable itself: not exercised here.)
    result = _run("import os, sys; before = dict(os.environ); import cpab, torch\n"
                  "m = cpab.CPAB((2, 2)); x = torch.rand(1, 3, 2) * 2 - 1\n"
                  "theta = m.fit(x, x + 0.01, method='gauss_newton', iterations=1); m.grid(theta, (4, 4))\n"
                  "print(sorted(k for k in sys.modules if k.split('.')[0] in ('triton', 'modules', 'configuration',"
                  " 'losses', 'train')), dict(os.environ) == before)", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[] True"
    for name in os.listdir(os.path.join(ROOT, "cpab")):
        if name.endswith(".py"):
            with open(os.path.join(ROOT, "cpab", name)) as handle:
                source = handle.read()
            assert not re.search(r"os\.environ\[[^]]+\]\s*=|environ\.setdefault|putenv|environ\.update", source), name


@pytest.mark.skipif(not fused.HAS_TRITON or torch.cuda.is_available(), reason="needs triton and no CUDA")
def test_triton_backend_on_cpu_without_the_interpreter_says_how_to_enable_it():
    result = _run("import torch, cpab\nm = cpab.CPAB((2, 2), backend='triton')\n"
                  "m.transform(torch.zeros(1, 2, 2), torch.zeros(1, m.dim))")
    assert result.returncode != 0 and "TRITON_INTERPRET=1" in result.stderr


def test_every_launch_is_a_listed_specialisation():
    # The compile check compiles fused.specialisations(); a launch outside its lists raises.
    model = CPAB((4, 4))
    geo = fused._Geometry(model)
    with pytest.raises(RuntimeError, match="unlisted"):
        geo.points(None, 3, 1, 1, torch.zeros(1), torch.zeros(1), size=(2, 2))
    specs = fused.specialisations([model])
    kinds = {(name, dtype) for name, dtype, _, _ in specs}
    assert kinds == {(k, d) for k in ("_points_kernel", "_cells_kernel", "_lm_kernel") for d in ("fp32", "fp64")}
    assert len(specs) == 2 * (len(fused.POINT_VARIANTS) + len(fused.CELL_VARIANTS) + len(fused.LM_VARIANTS))


@needs_interpreter
def test_gradient_with_respect_to_the_points_only():
    fast, slow = _pair((2, 2), torch.float64, steps=4, refine=1)
    theta = torch.randn(1, fast.dim, dtype=torch.float64)
    points = (1.8 * torch.rand(1, 5, 2, dtype=torch.float64) - 0.9).requires_grad_()
    grads = [torch.autograd.grad(m.transform(points, theta).square().sum(), points)[0] for m in (fast, slow)]
    _assert_close(grads[0], grads[1], 1e-12)
