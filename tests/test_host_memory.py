"""`host_memory`: freed heap back to the OS, and step memory kept mapped.

`release_free_heap` is checked on the process itself: about 200 MB of small
blocks (glibc serves them from its heap, not from separate mappings) are
freed below a block that stays in use, so glibc cannot trim them from the
heap's top on its own; the resident size must then drop by about that much,
and the block still in use must keep its contents.

`keep_freed_heap` (with `xla_env.run_cpu_computations_inline`) changes the
allocator (and jax's dispatch) for the rest of a process, so it is checked
in fresh processes: a 256 MiB block made a second time by the main thread
must not fault its pages in again (page faults from `getrusage`), while a
worker thread's heap still maps it anew.

`TemporariesReserve` is checked on the failure it prevents, made by hand
in a fresh process with the heap kept: 256 MiB "steps", the first freeing
its block below a block still in use, and a 128 MiB "checkpoint copy" made
between two steps, freed and released later. Without the reserve the copy
is cut from the freed block and the next step grows the heap on fresh
pages; with it, no step after the first grows the heap or faults a page in
again, and the copy's pages go back to the OS.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pix2seq_d_jax import host_memory

pytestmark = pytest.mark.skipif(
    not host_memory.available(), reason="needs glibc's malloc_trim and /proc")

MB = 2**20


def test_freed_heap_goes_back_to_the_os_and_live_blocks_keep_their_bytes():
  blocks = [bytearray(2000) for _ in range(100_000)]  # ~200 MB of heap.
  pinned = bytearray(np.arange(2000, dtype=np.uint8) % 251)
  expected = bytes(pinned)
  del blocks  # Free pages below `pinned`, still resident.
  before = host_memory.resident_bytes()
  released = host_memory.release_free_heap("test")
  after = host_memory.resident_bytes()
  assert released > 150 * MB, released / MB
  # What it reports is what the resident size shows.
  assert abs((before - after) - released) < 20 * MB
  assert bytes(pinned) == expected
  # Nothing is left to release right after.
  assert host_memory.release_free_heap() < 20 * MB


def test_without_malloc_trim_nothing_happens(monkeypatch):
  monkeypatch.setattr(host_memory, "_malloc_trim", lambda: None)
  assert host_memory.release_free_heap("test") == 0
  assert not host_memory.available()


_REALLOCATE = textwrap.dedent("""
    import json, resource, sys, threading
    from pix2seq_d_jax import host_memory

    keep, where = sys.argv[1] == "1", sys.argv[2]
    if keep:
      assert host_memory.keep_freed_heap()
    faults = []

    def faults_now():
      return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def allocate_twice():
      block = bytearray(256 * 2**20)  # Zero-filled: every page touched.
      del block
      before = faults_now()
      block = bytearray(256 * 2**20)
      faults.append(faults_now() - before)

    if where == "thread":
      thread = threading.Thread(target=allocate_twice)
      thread.start()
      thread.join()
    else:
      allocate_twice()
    print(json.dumps(faults[0]))
""")


def _refaults(keep: bool, where: str) -> int:
  """Page faults of the second of two 256 MiB allocations."""
  proc = subprocess.run(
      [sys.executable, "-c", _REALLOCATE, str(int(keep)), where],
      capture_output=True, text=True, timeout=120,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_freed_blocks_stay_mapped_for_the_next_allocation():
  pages = 256 * MB // 4096
  # glibc's defaults: a large block is a fresh mapping each time.
  assert _refaults(keep=False, where="main") > 0.9 * pages
  # Kept: the main heap hands the same pages back.
  assert _refaults(keep=True, where="main") < 0.02 * pages
  # Another thread's heap still maps such blocks anew (hence the inline
  # dispatch, `xla_env.run_cpu_computations_inline`).
  assert _refaults(keep=True, where="thread") > 0.9 * pages


_BETWEEN_STEPS = textwrap.dedent("""
    import contextlib, ctypes, json, resource, sys
    from pix2seq_d_jax import host_memory

    reserved = sys.argv[1] == "1"
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    MiB = 2**20
    temps = 256 * MiB
    assert host_memory.keep_freed_heap()
    reserve = host_memory.TemporariesReserve(temps if reserved else 0)
    record = []

    def faults():
      return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def step(pin=False):
      heap, before = host_memory.heap_bytes(), faults()
      with reserve.step():
        block = libc.malloc(temps)
        libc.memset(block, 1, temps)  # Every page touched.
        pinned = libc.malloc(MiB) if pin else None  # Above it, kept.
        libc.free(block)
      record.append({"grown": host_memory.heap_bytes() - heap,
                     "faults": faults() - before,
                     "rss": host_memory.resident_bytes()})
      return pinned

    pinned = step(pin=True)  # Its block is freed below a block in use.
    step()
    copy = libc.malloc(temps // 2)  # A checkpoint's copy, between steps.
    libc.memset(copy, 2, temps // 2)
    step()
    libc.free(copy)  # Written.
    host_memory.release_free_heap()
    step()
    step()
    print(json.dumps(record))
""")


def _between_steps(reserved: bool) -> list[dict]:
  """Five 256 MiB steps with a 128 MiB copy made and freed after 2 and 3.

  Per step: heap growth, page faults, and resident bytes after it.
  """
  proc = subprocess.run(
      [sys.executable, "-c", _BETWEEN_STEPS, str(int(reserved))],
      capture_output=True, text=True, timeout=120,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_reserve_keeps_the_temporaries_whole_across_what_runs_between():
  temps, pages = 256 * MB, 256 * MB // 4096
  plain = _between_steps(reserved=False)
  # The failure: what runs between steps is cut from the freed temporaries,
  # so a later step grows the heap by its whole block on fresh pages (the
  # second already: Python's own allocations between steps suffice), and
  # the release after the copy returns the temporaries' pages as well.
  assert max(later["grown"] for later in plain[1:]) > 0.9 * temps, plain
  assert sum(later["faults"] for later in plain[1:]) > 1.5 * pages, plain

  held = _between_steps(reserved=True)
  # Every step after the first reuses the first one's block: no growth,
  # no page faulted in again, the release after the copy included.
  for later in held[1:]:
    assert later["grown"] < 8 * MB, held
    assert later["faults"] < 0.02 * pages, held
  # The copy's pages went back: resident size as before it.
  assert abs(held[4]["rss"] - held[1]["rss"]) < 16 * MB, held


def test_reserve_holds_the_block_only_between_steps():
  reserve = host_memory.TemporariesReserve(64 * MB)
  assert reserve.active and not reserve.holds_block
  with reserve:
    with reserve.step():
      assert not reserve.holds_block  # The step has it.
    assert reserve.holds_block
    with pytest.raises(RuntimeError, match="step failed"):
      with reserve.step():
        raise RuntimeError("step failed")
    assert not reserve.holds_block  # Not taken back after a failed step.
    with reserve.step():
      pass
    assert reserve.holds_block
  assert not reserve.holds_block  # Freed when the steps are done.


def test_reserve_stops_when_the_block_does_not_fit(monkeypatch):
  # Taking the block back grew the heap by its size: the step's temporaries
  # were not one such block, so holding fresh pages keeps nothing.
  heap = iter([0, 0, 10, 10 + 64 * MB])
  monkeypatch.setattr(host_memory, "heap_bytes", lambda: next(heap))
  reserve = host_memory.TemporariesReserve(64 * MB)
  with reserve.step():
    pass
  assert reserve.holds_block  # Grew by 0: held.
  with reserve.step():
    pass
  assert not reserve.holds_block and not reserve.active
  with reserve.step():
    pass  # Nothing held any more, no heap read.
  assert not reserve.holds_block


def test_empty_reserve_does_nothing(monkeypatch):
  monkeypatch.setattr(host_memory, "_malloc_and_free", lambda: None)
  for reserve in (host_memory.TemporariesReserve(0),
                  host_memory.TemporariesReserve(64 * MB)):
    assert not reserve.active
    with reserve.step():
      pass
    assert not reserve.holds_block
  with pytest.raises(ValueError, match="temp_bytes=-1"):
    host_memory.TemporariesReserve(-1)


def test_reuse_host_memory_must_be_a_bool():
  from configs import synthetic
  from pix2seq_d_jax import config_lib

  config = synthetic.get_config("tiny")
  config_lib.validate(config)
  del config["reuse_host_memory"]  # The field's type is bool: retyped.
  config.reuse_host_memory = "yes"
  with pytest.raises(config_lib.ConfigError, match="reuse_host_memory"):
    config_lib.validate(config)


def test_inline_dispatch_is_set_before_the_backend_starts():
  code = textwrap.dedent("""
      import jax
      from pix2seq_d_jax import xla_env
      assert jax.config.values["jax_cpu_enable_async_dispatch"]
      xla_env.run_cpu_computations_inline()
      print(jax.config.values["jax_cpu_enable_async_dispatch"])
  """)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ["False"]
  # Too late once the backend exists: said, not silently ignored.
  late = subprocess.run(
      [sys.executable, "-c", "import jax; jax.devices()\n" + code],
      capture_output=True, text=True, timeout=120)
  assert "takes effect only in a new process" in late.stderr
