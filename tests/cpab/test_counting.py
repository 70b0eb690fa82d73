"""cpab.counting counts kernel launches and (emulated) host syncs; the Triton path's budgets are pinned.

Budgets (issue 13): an Adam iteration <= 4 launches and no host sync; a Gauss-Newton iteration <= 8
launches; no host sync in a whole fit. The exact counts are pinned so a regression shows."""
import pytest
import torch

from cpab import benchmark, counting, fused
from cpab.counting import count_device_work

needs_interpreter = pytest.mark.skipif(not fused.interpreter_available() or torch.cuda.is_available(),
                                       reason="counts the Triton path on CPU (interpreter)")


def test_views_and_allocations_are_free_kernels_count():
    x = torch.randn(4, 3)
    counts = count_device_work(lambda: (x.view(-1), x.t(), x[1:], x.unsqueeze(0), x.expand(2, 4, 3),
                                        torch.empty(5), x.reshape(2, 6)))
    assert (counts.launches, counts.syncs) == (0, 0)
    counts = count_device_work(lambda: (x + 1, x.sum(), torch.zeros(3), x.t().contiguous()))
    assert (counts.launches, counts.syncs) == (4, 0)
    assert counts.ops == {"add": 1, "sum": 1, "zeros": 1, "clone": 1}


@pytest.mark.parametrize("call", [
    lambda x: x[0, 0].item(), lambda x: bool(x[0, 0] > 0), lambda x: float(x.sum()), lambda x: int(x[0, 0]),
    lambda x: x.nonzero(), lambda x: x[x > 0], lambda x: torch.unique(x), lambda x: x.tolist(),
    lambda x: x.cpu(), lambda x: x.numpy(), lambda x: torch.masked_select(x, x > 0),
    lambda x: torch.arange(3).repeat_interleave(torch.tensor([1, 2, 0])),
    lambda x: torch.linalg.solve(torch.eye(3), x[:3, :1]), lambda x: torch.equal(x, x),
])
def test_host_syncs_are_counted(call):
    assert count_device_work(lambda: call(torch.randn(4, 3))).syncs >= 1


def test_sync_free_variants_are_not_syncs():
    x = torch.randn(4, 3)
    calls = (lambda: torch.linalg.solve_ex(torch.eye(3), x[:3], check_errors=False),
             lambda: torch.where(x > 0, x, 0.0), lambda: torch.arange(3).repeat_interleave(2),
             lambda: torch.arange(3).repeat_interleave(torch.tensor([1, 2, 0]), output_size=3))
    for call in calls:
        assert count_device_work(call).syncs == 0


def test_cuda_synchronize_is_counted(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    assert count_device_work(lambda: torch.cuda.synchronize()).syncs == 1
    assert torch.cuda.synchronize.__name__ == "<lambda>"  # restored afterwards


def test_triton_launches_count_once_and_their_insides_not_at_all():
    def fake_launch():
        with counting.launch("kernel"):
            torch.zeros(3).add_(1).tolist()  # what an interpreter does with its arguments
    counts = count_device_work(fake_launch)
    assert (counts.launches, counts.syncs, dict(counts.ops)) == (1, 0, {"triton.kernel": 1})


@needs_interpreter
def test_launch_and_sync_budgets_of_the_triton_path():
    result = benchmark.counts("triton", adam_iterations=2, gn_iterations=2)
    adam, gn = benchmark.per_iteration(result, "adam"), benchmark.per_iteration(result, "gauss_newton")
    assert adam == (2, 0)   # budget: <= 4 launches, no sync (points kernel + cells kernel)
    assert gn == (6, 0)     # budget: <= 8 (solve, cells, points, cells rows, bmm, LM kernel)
    assert all(c.syncs == 0 for c in result.values())  # whole fits included
    assert {name: c.launches for name, c in result.items() if "fit" not in name} == {
        "transform forward": 2, "transform backward": 3, "grid forward": 2, "grid backward": 3,
        "transform_jacobian": 4}
    assert result["adam fit, 1 iteration"].launches <= 6  # the start: constants, zeroed rows, the first table


@needs_interpreter
def test_counts_do_not_depend_on_the_sizes():
    from cpab import CPAB

    def adam_launches(tess, batch, n):
        model = CPAB(tess, steps=2, refine=1, backend="triton")
        x = torch.rand(batch, n, 2) * 1.6 - 0.8
        model.fit(x, x + 0.02, iterations=1)
        return [count_device_work(lambda k=k: model.fit(x, x + 0.02, iterations=k)).launches for k in (1, 2)]

    assert adam_launches((1, 1), 1, 2) == adam_launches((2, 2), 3, 40)
