"""The process's glibc heap: freed pages back to the OS, or kept for reuse.

XLA's compiler and the state's initialisation allocate gigabytes of host
memory through the C library's `malloc` and free them again, but glibc keeps
freed pages inside its heap (it trims a heap only from the top), so the
process stays resident at the compile's high-water mark and the train step's
temporaries then stack on top of it. On the paper model at 256 / 128 (batch
2, one CPU), compiling the step leaves about 1 GiB of such free pages and
initialising the state another 0.6 GiB. `release_free_heap` calls glibc's
`malloc_trim(0)`, which returns every free page of every heap; nothing in
use moves, and later allocations simply map pages again.

The opposite matters once training runs: the step's temporaries should stay
mapped from one step to the next (`keep_freed_heap`, on by default through
`config.reuse_host_memory`). Other C libraries (macOS, musl) have none of
these calls and are left alone.

Keeping freed memory has one failure mode, which `TemporariesReserve`
prevents: the freed temporaries are the heap's one large free block, so
whatever is allocated between two steps is cut from it (a checkpoint's host
copy of the state, a compile). The next step's temporaries then no longer
fit and are placed above it on fresh pages: that step takes several times
as long, and the old block stays resident for good.
"""

import contextlib
import ctypes
import functools
import os
from collections.abc import Iterator

from absl import logging


@functools.cache
def _libc():
  """The process's C library, or None where ctypes cannot open it."""
  try:
    return ctypes.CDLL(None)
  except OSError:
    return None


@functools.cache
def _malloc_trim():
  """glibc's `malloc_trim`, or None where the C library has none."""
  trim = getattr(_libc(), "malloc_trim", None)
  if trim is not None:
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
  return trim


def resident_bytes() -> int | None:
  """This process's current resident size (Linux's VmRSS), else None."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def release_free_heap(why: str = "") -> int:
  """Returns the heap's free pages to the OS; the resident bytes it saved.

  Call it after something that allocated and freed a lot of host memory
  (a compile, the initialisation, an evaluation) and before the memory
  peak that follows (the train step's temporaries). Returns 0 where the C
  library has no `malloc_trim` or the resident size cannot be read.
  `why`, when given, is logged with the amount released.
  """
  trim = _malloc_trim()
  if trim is None:
    return 0
  before = resident_bytes()
  trim(0)
  after = resident_bytes()
  if before is None or after is None:
    return 0
  released = max(0, before - after)
  if why:
    logging.info("Returned %.2f GiB of freed host memory to the OS (%s); "
                 "resident %.2f GiB.", released / 2**30, why, after / 2**30)
  return released


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def _mallopt(param: int, value: int) -> bool:
  mallopt = getattr(_libc(), "mallopt", None)
  if mallopt is None:
    return False
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  return bool(mallopt(param, value))


def keep_freed_heap() -> bool:
  """From now on, freed memory stays in the heap for the next allocation.

  By default glibc serves a block above its mmap threshold (at most 32 MiB)
  with a fresh `mmap` that `free` unmaps again: the paper step's 2.3 GiB of
  temporaries (256 / 128, batch 2) were mapped, faulted in page by page
  (about 700,000 page faults, 1.4 s of kernel time per step) and unmapped
  at every step. With no `mmap` and no automatic trimming, each step reuses
  the pages of the previous one's temporaries. This holds for the main
  heap, i.e. for computations that run on the thread that calls them
  (`xla_env.run_cpu_computations_inline`, which the entry points call):
  other threads' heaps still map such blocks anew. Call it after
  `release_free_heap` has returned what the compiles left behind. Returns
  whether glibc accepted both settings.
  """
  if _malloc_trim() is None:
    return False
  # -1 is SIZE_MAX for glibc: never trim the heap's top on `free`.
  return _mallopt(_M_MMAP_MAX, 0) and _mallopt(_M_TRIM_THRESHOLD, -1)


def available() -> bool:
  """Whether this platform can release free heap pages (glibc on Linux)."""
  return _malloc_trim() is not None and os.path.exists("/proc/self/status")


class _MallInfo2(ctypes.Structure):
  """glibc's `struct mallinfo2` (malloc.h, glibc >= 2.33): bytes, not ints."""
  _fields_ = [(name, ctypes.c_size_t) for name in (
      "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
      "uordblks", "fordblks", "keepcost")]


@functools.cache
def _malloc_and_free():
  """glibc's `malloc` and `free`, or None where ctypes cannot reach them."""
  malloc = getattr(_libc(), "malloc", None)
  free = getattr(_libc(), "free", None)
  if malloc is None or free is None:
    return None
  malloc.argtypes = [ctypes.c_size_t]
  malloc.restype = ctypes.c_void_p
  free.argtypes = [ctypes.c_void_p]
  free.restype = None
  return malloc, free


@functools.cache
def _mallinfo2():
  """glibc's `mallinfo2`, or None where the C library has none."""
  info = getattr(_libc(), "mallinfo2", None)
  if info is not None:
    info.argtypes = []
    info.restype = _MallInfo2
  return info


def heap_bytes() -> int | None:
  """Bytes the heaps hold from the OS (`mallinfo2().arena`), else None.

  Every arena's heap, in use or free, resident or not; blocks served by
  their own `mmap` are not counted. About 20 microseconds.
  """
  info = _mallinfo2()
  return None if info is None else int(info().arena)


# Below this, glibc's own choices (a block under its mmap threshold of up to
# 32 MiB may come from the heap or its own mapping) make heap growth at the
# re-take no sign that the temporaries were placed elsewhere.
_SMALLEST_CHECKED_BLOCK = 64 * 2**20


class TemporariesReserve:
  """Keeps the train step's freed temporaries for the next step.

  With `keep_freed_heap` on, each step's temporaries reuse the block the
  previous step freed. Anything allocated between two steps is cut from
  that block, it being the heap's only large free one; the next step's
  temporaries then grow the heap on fresh pages, and the old block stays
  resident. Measured on the paper model at 256 / 128 (temporaries 2.3 GiB,
  one CPU): the step after the first log step (whose helpers compiled)
  took 7 s instead of 3.3 s and left the process 2.3 GiB larger, and so
  did each checkpoint (its host copy of the state), by 4.6 GB each.

  So between steps the reserve holds the block: a `malloc` of the
  temporaries' size takes exactly it (the best fit) and touches no page,
  and `step()` frees it just before the step, which reuses it. What runs
  between steps is placed elsewhere, and `release_free_heap` can then
  return what it freed (a checkpoint's buffers) without returning the
  temporaries' pages, which the next step would otherwise fault in again.
  Work that would rather reuse those pages (an evaluation, whose programs
  run on the same thread) calls `close()` first; the step after it takes
  the block back.

  Use `with reserve.step(): state, metrics = step(state, ...)` for each
  step and `close()` (or `with reserve:`) when the steps are done. A
  reserve of 0 bytes, or one where glibc's calls are missing, does
  nothing. If taking a block of 64 MiB or more back grows the heap, the
  step's temporaries were not one block of `temp_bytes` (true of XLA:CPU's
  step today): the reserve then lets go and stops, with a warning.
  """

  def __init__(self, temp_bytes: int):
    """`temp_bytes`: the step's temporaries (XLA's memory analysis)."""
    if temp_bytes < 0:
      raise ValueError(f"TemporariesReserve(temp_bytes={temp_bytes}): "
                       "expected >= 0")
    self.temp_bytes = temp_bytes
    self._block: int | None = None

  @property
  def active(self) -> bool:
    """Whether it holds the block between steps (glibc, temporaries > 0)."""
    return (self.temp_bytes > 0 and _malloc_and_free() is not None
            and _malloc_trim() is not None)

  @property
  def holds_block(self) -> bool:
    """Whether the temporaries' block is held now (between steps)."""
    return self._block is not None

  @contextlib.contextmanager
  def step(self) -> Iterator[None]:
    """Hands the block to the step run inside, and takes it back after.

    If the step raises, the block is not taken back.
    """
    if not self.active:
      yield
      return
    self.close()
    yield
    heap = heap_bytes()
    self._block = _malloc_and_free()[0](self.temp_bytes) or None
    if (heap is not None and self.temp_bytes >= _SMALLEST_CHECKED_BLOCK
        and heap_bytes() - heap > self.temp_bytes // 2):
      # The block did not fit where the step's temporaries were (they are
      # not one block of this size): holding fresh pages would keep nothing.
      logging.warning(
          "The train step's temporaries are not one freed block of %.2f GiB "
          "(XLA's memory analysis); no longer holding them between steps.",
          self.temp_bytes / 2**30)
      self.close()
      self.temp_bytes = 0

  def close(self) -> None:
    """Frees the block held between steps (if any)."""
    block, self._block = self._block, None
    if block:
      _malloc_and_free()[1](block)

  def __enter__(self) -> "TemporariesReserve":
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()
