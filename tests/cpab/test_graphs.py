"""cpab.graphs: fits are captured once per key and replayed; captures are thread-local, never synchronise
or empty the allocator's cache, fall back to eager only when capture is unsupported (CPU test with a fake
CUDA graph API; tests/cpab/test_gpu.py runs the real one)."""
import contextlib
import warnings

import pytest
import torch

from cpab import graphs


class _FakeGraph:
    instances = []

    def __init__(self):
        self.modes, self.replays, self.ended = [], 0, False
        _FakeGraph.instances.append(self)

    def capture_begin(self, pool=None, capture_error_mode="global"):
        self.modes.append(capture_error_mode)

    def capture_end(self):
        self.ended = True

    def replay(self):
        self.replays += 1


class _FakeStream:
    def __init__(self, device=None):
        self.waited = []

    def wait_stream(self, other):
        self.waited.append(other)


@pytest.fixture
def fake_cuda(monkeypatch):
    calls = {"synchronize": 0, "empty_cache": 0}
    current = _FakeStream()
    _FakeGraph.instances.clear()

    def synchronize(device=None):
        calls["synchronize"] += 1

    def empty_cache():
        calls["empty_cache"] += 1

    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    monkeypatch.setattr(graphs, "_warned", False)
    return calls


def _program(log):
    def program(workspace):
        log.append(workspace["x"].clone())
        workspace["out"].copy_(2 * workspace["x"])
    return program


def test_capture_is_thread_local_and_neither_synchronises_nor_empties_the_cache(fake_cuda):
    graph = graphs.capture(lambda: None, torch.device("cuda"))
    assert isinstance(graph, _FakeGraph) and graph.modes == ["thread_local"] and graph.ended
    assert fake_cuda == {"synchronize": 0, "empty_cache": 0}


def test_repeated_runs_capture_once_and_replay_with_the_new_inputs(fake_cuda):
    cache, log = graphs.GraphCache(max_entries=2), []
    make = lambda: {"x": torch.zeros(3), "out": torch.zeros(3)}  # noqa: E731
    first = cache.run("a", torch.device("cuda"), make, _program(log), {"x": torch.ones(3)})
    assert torch.equal(first["out"], 2 * torch.ones(3))  # the first call's eager run gives the result
    assert cache.captures == 1 and len(log) == 2  # eager run + the capture's (recorded) run
    again = cache.run("a", torch.device("cuda"), make, _program(log), {"x": torch.full((3,), 5.0)})
    assert again is first and torch.equal(again["x"], torch.full((3,), 5.0))  # inputs copied into static buffers
    assert cache.captures == 1 and len(log) == 2 and _FakeGraph.instances[0].replays == 1
    for key in ("b", "c"):
        cache.run(key, torch.device("cuda"), make, _program(log), {"x": torch.ones(3)})
    assert len(cache) == 2 and cache.captures == 3  # bounded: the least recently used key went


@pytest.mark.parametrize("message", ["operation not permitted when stream is capturing",
                                     "CUDA error: operation failed due to a previous error during capture"])
def test_unsupported_capture_falls_back_to_eager_with_one_warning(fake_cuda, message):
    def program():
        raise RuntimeError(message)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert graphs.capture(program, torch.device("cuda")) is None
        assert graphs.capture(program, torch.device("cuda")) is None
    assert len([w for w in caught if "CUDA-graph capture" in str(w.message)]) == 1
    assert fake_cuda["synchronize"] == 2  # each failure checks for a sticky error before carrying on


def test_sticky_errors_and_other_errors_are_raised(fake_cuda, monkeypatch):
    def broken(device=None):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def program():
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "synchronize", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        graphs.capture(program, torch.device("cuda"))

    def other():
        raise RuntimeError("CUDA error: device-side assert triggered")

    with pytest.raises(RuntimeError, match="device-side assert"):
        graphs.capture(other, torch.device("cuda"))


def test_a_key_whose_capture_is_unsupported_runs_eagerly_afterwards(fake_cuda, monkeypatch):
    monkeypatch.setattr(graphs, "capture", lambda program, device: None)
    cache, log = graphs.GraphCache(), []
    make = lambda: {"x": torch.zeros(2), "out": torch.zeros(2)}  # noqa: E731
    cache.run("k", torch.device("cuda"), make, _program(log), {"x": torch.ones(2)})
    out = cache.run("k", torch.device("cuda"), make, _program(log), {"x": torch.full((2,), 3.0)})
    assert cache.captures == 0 and len(log) == 2 and torch.equal(out["out"], torch.full((2,), 6.0))
