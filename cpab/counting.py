"""Counting the device work of a callable on any device: kernel launches and host synchronisations.

`count_device_work(fn)` runs `fn()` once and returns `Counts(launches, syncs, ops)`:
- launches: the aten operators that run a device kernel (everything dispatched except views,
  allocations and other metadata-only operators) plus the Triton launches issued through cpab's
  launcher (`cpab.fused`); one aten operator counts one launch (on CUDA a few run several kernels,
  e.g. the batched linear solvers);
- syncs: the host synchronisations the same code performs on CUDA, emulated so that they can be counted
  on a CPU as well: reading a tensor value on the host (`.item()`, `bool()`, `int()`, `float()`:
  aten `_local_scalar_dense`), operators whose output shape depends on the data (`nonzero`,
  `masked_select`, `unique*`, `repeat_interleave` without `output_size`, boolean-mask indexing,
  `bincount`), `equal`/`allclose`, the error checks of the non-`_ex` linear-algebra functions, copies to
  the host (`.cpu()`, `.numpy()`, `.tolist()`) and `torch.cuda.synchronize()`. A copy written
  `.to("cpu")` is not distinguishable from a host-to-device copy when counting on a CPU and is not
  counted.
- ops: a `collections.Counter` of every counted operator name (launches and syncs) for diagnosis.

The count is of what is dispatched eagerly: a CUDA-graph replay replaces its captured launches by one
graph launch, which this tool (run on a CPU, where there are no graphs) does not model. Triton kernels
on CPU tensors need the Triton interpreter (see cpab/README.md). Imports only torch.
"""
from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_FREE = {  # metadata-only operators: no device kernel
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "resize_", "set_",
    "_unsafe_view", "_reshape_alias", "lift_fresh", "sym_size", "sym_stride", "sym_numel",
    "sym_storage_offset", "_local_scalar_dense", "_linalg_check_errors", "is_same_size", "result_type",
}
_SYNCING = {  # operators whose result (or its shape) the host waits for on CUDA
    "_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "unique_dim_consecutive", "equal", "allclose", "bincount", "_linalg_check_errors",
}
_HOST_COPIES = {"cpu", "numpy", "tolist"}
_listeners: list[Callable[[str], None]] = []  # cpab's launcher reports every Triton launch here
_inside_launch = [0]  # > 0 while a Triton launch runs: what the interpreter does with torch is not counted


@contextlib.contextmanager
def launch(name: str):
    """Wraps one Triton kernel launch by cpab's launcher: counts it once, and nothing that runs inside it
    (the Triton interpreter copies its tensor arguments with torch operators)."""
    for listener in _listeners:
        listener(name)
    _inside_launch[0] += 1
    try:
        yield
    finally:
        _inside_launch[0] -= 1


@dataclass
class Counts:
    """Device work of one call: kernel launches, host synchronisations, and per-operator counts."""
    launches: int = 0
    syncs: int = 0
    ops: collections.Counter = field(default_factory=collections.Counter)

    def add(self, name: str, launch: bool, sync: bool) -> None:
        self.launches += int(launch)
        self.syncs += int(sync)
        if launch or sync:
            self.ops[name] += 1


def _is_view(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices or ())


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, counts: Counts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _inside_launch[0]:
            return func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        sync = name in _SYNCING
        if name == "repeat_interleave":
            sync = any(isinstance(a, torch.Tensor) for a in args) and kwargs.get("output_size") is None
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            sync = _has_bool_index(args)
        launch = name not in _FREE and not _is_view(func)
        self.counts.add(str(func.overloadpacket.__name__) if launch or sync else name, launch, sync)
        return func(*args, **kwargs)


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, counts: Counts):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _HOST_COPIES and not _inside_launch[0] and args and isinstance(args[0], torch.Tensor):
            self.counts.add(f"Tensor.{name}", launch=False, sync=True)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _counting_synchronize(counts: Counts):
    original = torch.cuda.synchronize

    def synchronize(device=None):
        counts.add("cuda.synchronize", launch=False, sync=True)
        return original(device)

    torch.cuda.synchronize = synchronize
    try:
        yield
    finally:
        torch.cuda.synchronize = original


def count_device_work(fn: Callable[[], object]) -> Counts:
    """Runs fn() once and counts its kernel launches and host synchronisations (see the module docstring)."""
    counts = Counts()

    def listener(name: str) -> None:
        counts.add(f"triton.{name}", launch=True, sync=False)

    _listeners.append(listener)
    try:
        with _counting_synchronize(counts), _FunctionCounter(counts), _DispatchCounter(counts):
            fn()
    finally:
        _listeners.remove(listener)
    return counts
