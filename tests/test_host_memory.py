"""`host_memory.release_free_heap` returns freed heap pages to the OS.

Checked on the process itself: about 200 MB of small blocks (glibc serves
them from its heap, not from separate mappings) are freed below a block
that stays in use, so glibc cannot trim them from the heap's top on its
own; the resident size must then drop by about that much, and the block
still in use must keep its contents.
"""

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
