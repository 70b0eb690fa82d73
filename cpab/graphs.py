"""CUDA graphs of whole fits: captured once per key, replayed with static buffers.

`GraphCache.run(key, device, make_workspace, program, inputs)`:
- the first call with a key builds the workspace (static buffers), copies the inputs in, runs
  `program(workspace)` eagerly (which also compiles its kernels), then captures the same program as a
  CUDA graph and keeps the graph with its workspace;
- later calls copy the inputs into the static buffers and replay the graph (one launch for the whole
  program, no host synchronisation).
The caller reads the results from the workspace (and clones what it returns: the next replay
overwrites them). The capture runs on a side stream of the tensors' device in "thread_local" error
mode (another thread, e.g. a DataLoader's pin-memory thread, may use CUDA meanwhile), and neither
synchronises nor empties the allocator's cache (what `torch.cuda.graph` does on entry). Allocations
made during the capture come from the graph's private memory pool, which lives as long as the graph.
When the capture is not supported (an operator of the program cannot be captured), the key runs eagerly
from then on, after one warning per process; any other error, a sticky CUDA error in particular, is
raised. The cache keeps the `max_entries` most recently used keys.
"""
from __future__ import annotations

import collections
import warnings
from collections.abc import Callable, Hashable

import torch

_warned = False


def _capture_not_supported(error: BaseException, device: torch.device) -> bool:
    """Whether a capture failure means "this program cannot be captured" (then eager is correct)."""
    if "captur" not in str(error).lower():
        return False
    torch.cuda.synchronize(device)  # a sticky error (the context is broken) raises here, not swallowed
    return True


def capture(program: Callable[[], None], device: torch.device) -> torch.cuda.CUDAGraph | None:
    """A CUDA graph of program() (already run once eagerly), or None if its capture is not supported."""
    global _warned
    current = torch.cuda.current_stream(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(current)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(stream):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                program()
            finally:
                graph.capture_end()
    except RuntimeError as error:
        if not _capture_not_supported(error, device):
            raise
        if not _warned:
            _warned = True
            warnings.warn(f"cpab: CUDA-graph capture is not supported here ({error}); running eagerly",
                          RuntimeWarning, stacklevel=3)
        return None
    current.wait_stream(stream)
    return graph


class GraphCache:
    """Graphs (and their static workspaces) keyed by everything the captured program depends on."""

    def __init__(self, max_entries: int = 8):
        self.max_entries = max_entries
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self.captures = 0  # graphs captured so far (tests check that repeated fits capture once)

    def __len__(self) -> int:
        return len(self._entries)

    def run(self, key: Hashable, device: torch.device, make_workspace: Callable[[], dict],
            program: Callable[[dict], None], inputs: dict) -> dict:
        """Runs program on a workspace whose tensors named in inputs hold those values; returns the workspace."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            workspace, graph = entry
            for name, value in inputs.items():
                workspace[name].copy_(value)
            if graph is None:
                program(workspace)
            else:
                graph.replay()
            return workspace
        workspace = make_workspace()
        for name, value in inputs.items():
            workspace[name].copy_(value)
        program(workspace)
        graph = capture(lambda: program(workspace), device)
        self.captures += graph is not None
        self._entries[key] = (workspace, graph)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return workspace
