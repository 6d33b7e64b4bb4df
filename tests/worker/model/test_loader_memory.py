"""The loader gives the C heap's freed pages back after reading the tokenizer (`release_free_heap`):
parsing Gemma 3's 33 MB tokenizer.json leaves about 200 MB freed but resident otherwise."""
from __future__ import annotations

import ctypes

from worker.model.loader import release_free_heap


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def test_freed_heap_below_a_live_block_goes_back_to_the_system() -> None:
    # Given 150 MB of small C allocations (heap, not mmap), all freed but the last, which pins the
    # heap's top so the freed pages stay resident, as after a parser's many small allocations
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = []
    for _ in range(150_000):
        block = libc.malloc(1000)
        ctypes.memset(block, 1, 1000)  # touched, so resident
        blocks.append(block)
    for block in blocks[:-1]:
        libc.free(block)
    before = _rss_bytes()
    # When the free heap is released / Then most of it leaves the process's resident memory
    assert release_free_heap()
    assert before - _rss_bytes() > 100e6
    libc.free(blocks[-1])
