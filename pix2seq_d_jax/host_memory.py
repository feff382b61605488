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
"""

import ctypes
import functools
import os

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
