"""Give back to the OS the pages of a float weight that was dropped while its checkpoint stays memory-mapped.

transformers loads safetensors memory-mapped (one private, copy-on-write mapping of each file). Every tensor's
storage points into that mapping, which stays mapped for as long as any of its tensors lives (the vision tower's,
the embeddings'). So when `quantize_after_loading` replaces a float weight by packed codes, the weight's pages stay
resident: as RssFile where they were only read, as RssAnon where the rotation wrote them (copy on write). On a
LLaVA-1.5-7B-shaped model that kept every decoder weight of the model in memory next to its codes
(docs/performance.md, Size and memory). `released_when_dropped` hands those pages back with
madvise(MADV_DONTNEED) once nothing uses the weight any more.

It only ever releases memory nobody can read:

- whole pages inside the storage's bytes (safetensors tensors never overlap, so no other tensor lies on them);
- only when the storage's one remaining user is the reference held here: no tensor, view, Parameter or Python
  storage object anywhere still uses it. That reference also keeps the mapping alive until the call is done;
- only inside a private file-backed mapping: anonymous memory belongs to the allocator, and a page of a private
  file mapping that is released reads back from the file, never as someone else's memory.

Anywhere else (not Linux, not a CPU tensor, not memory-mapped, a torch without `_storage_Use_Count`) it does
nothing, so it is a no-op for a model on CUDA or one that was built in memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

MADV_DONTNEED = 4  # linux/mman-common.h


@dataclass
class PageRelease:
    """What a `released_when_dropped` block gave back: bytes (whole pages) returned to the OS."""

    released_bytes: int = 0


@contextlib.contextmanager
def released_when_dropped(tensors: Iterable[torch.Tensor]) -> Iterator[PageRelease]:
    """Inside the block the caller drops its uses of ``tensors``; on exit, the pages of each one that nobody uses
    any more go back to the OS (when they lie in a memory-mapped checkpoint, see the module docstring).

    Example (how `quantize_linears` swaps a layer; no name is left holding the old module)::

        with released_when_dropped(attention.q_proj.parameters()):
            attention.q_proj = QuantLinear.from_linear(attention.q_proj, spec)

    Nothing is released when the block raises.
    """
    storages = [s for s in map(_mapped_storage_candidate, tensors) if s is not None]
    del tensors  # a parameters() generator would otherwise keep the dropped module alive
    result = PageRelease()
    yield result
    while storages:
        result.released_bytes += _release_last(storages)


def _mapped_storage_candidate(tensor: torch.Tensor) -> torch.UntypedStorage | None:
    """The tensor's storage, when it is one that could lie in a memory mapping and spans at least a whole page."""
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu":
        return None
    if not hasattr(torch._C, "_storage_Use_Count"):
        return None
    storage = tensor.untyped_storage()
    return storage if _whole_pages(storage.data_ptr(), storage.nbytes()) is not None else None


def _whole_pages(start: int, nbytes: int) -> tuple[int, int] | None:
    """(first address, length) of the pages that lie entirely inside ``[start, start + nbytes)``."""
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (start + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    return (first, end - first) if end > first else None


def _last_item_references(storages: list[torch.UntypedStorage]) -> int:
    return sys.getrefcount(storages[-1])


# what `_last_item_references` reads for an object that only the list holds; measured rather than assumed, because
# the references the interpreter itself holds during the call differ between Python versions
_ONLY_IN_LIST = _last_item_references([torch.UntypedStorage(0)])


def _release_last(storages: list[torch.UntypedStorage]) -> int:
    """Pop the last storage; madvise(MADV_DONTNEED) its whole pages first if the list held its one remaining user
    (no tensor uses it: the use count is the storage object's own; no one else holds that object) and it lies in a
    private file mapping. The list's reference keeps the mapping alive until then. Returns the bytes released."""
    storage = storages[-1]
    unused = torch._C._storage_Use_Count(storage._cdata) == 1
    pages = _whole_pages(storage.data_ptr(), storage.nbytes())
    del storage
    released = 0
    if unused and _last_item_references(storages) == _ONLY_IN_LIST and in_private_file_mapping(*pages):
        released = pages[1] if _madvise_dontneed(*pages) else 0
    storages.pop()
    return released


def in_private_file_mapping(start: int, length: int) -> bool:
    """Whether ``[start, start + length)`` lies inside one private (copy-on-write) mapping of a file."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(bound, 16) for bound in fields[0].split("-"))
            if low <= start < high:
                return start + length <= high and fields[1][3] == "p" and fields[4] != "0"
    return False


@functools.cache
def _libc_madvise() -> Callable[[int, int, int], int]:
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return madvise


def _madvise_dontneed(start: int, length: int) -> bool:
    return _libc_madvise()(start, length, MADV_DONTNEED) == 0
