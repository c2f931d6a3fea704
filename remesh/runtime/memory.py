"""Peak tensor memory of this process: what the planner's memory estimate is checked against.

On a GPU that is the caching allocator's own count (`torch.cuda.max_memory_allocated`). A CPU
process has no such count, and its resident size also holds the interpreter, the libraries and
what glibc keeps after a free. `PeakTensorMemory` counts the same thing as the GPU allocator on
any device: the bytes of live tensor storages, from every tensor reachable when it opens (and
their gradients) plus every storage an operator creates while it is open, each released when its
storage is freed. Tracking every operator costs Python time: measure memory and time in
separate runs.
"""

from __future__ import annotations

import gc
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorMemory(TorchDispatchMode):
    """`with PeakTensorMemory() as m: ...` -> m.peak: the most bytes of live storages at once
    (on `device` type, default CPU); `m.reset_peak()` starts a new window (m.live stays)."""

    def __init__(self, device: str = "cpu"):
        super().__init__()
        self.device = torch.device(device).type
        self.live = 0
        self.peak = 0
        self.max_peak = 0
        self._refs: dict[int, weakref.ref] = {}  # storage id -> weak reference (its callback frees the bytes)

    def __enter__(self) -> PeakTensorMemory:
        gc.collect()
        for obj in gc.get_objects():
            if issubclass(type(obj), torch.Tensor):  # type(): no attribute lookups on odd objects
                self._track(obj)
                if obj.is_leaf and obj.grad is not None:  # only leaves hold gradients (and reading a non-leaf's warns)
                    self._track(obj.grad)
        super().__enter__()
        return self

    def reset_peak(self) -> None:
        self.peak = self.live

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type != self.device:
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return  # a wrapper subclass: no storage of its own
        key = st._cdata
        if key in self._refs or st.nbytes() == 0:
            return
        nbytes = st.nbytes()

        def freed(_ref, key=key, nbytes=nbytes):
            if self._refs.pop(key, None) is not None:
                self.live -= nbytes

        # storages keep their Python object while they live (PyObject preservation), so the
        # reference dies with the storage itself, not with one tensor that pointed at it
        self._refs[key] = weakref.ref(st, freed)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self.max_peak = max(self.max_peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out
