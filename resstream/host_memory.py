"""On a CPU, let each compiled step reuse the memory the step before it freed.

XLA's CPU backend allocates each execution's temporary buffer (every activation a train step keeps
for its backward pass: tens to hundreds of MB) when the program starts and frees it when it ends.
glibc serves a block that large with mmap and frees it with munmap, so every step maps fresh pages,
and the kernel faults in and zeroes the whole buffer again: one fault per 4 KiB page, every step
(benchmarks/train_vs_pytorch.py prints the faults per step and what they cost).

`reuse_step_buffers()` turns that off for a training process:
- glibc's malloc keeps freed memory in its heap (no mmap'd blocks, no trimming), so the next step's
  buffer reuses the last step's pages;
- JAX runs CPU programs on the calling thread (`jax_cpu_enable_async_dispatch=False`): a program
  dispatched asynchronously allocates on a worker thread, whose glibc arena cannot hold a block over
  64 MiB and maps it anyway. The training loop reads the loss of a step only where it logs, but on a
  CPU the host and the "device" share the same cores, so running ahead gains little.
The process keeps its peak memory until it exits, as a training process does anyway. Both settings
are process-wide, so the library applies them only where it owns the process (the training loop),
and the dispatch setting only before JAX's CPU backend has started. Set
RESSTREAM_REUSE_STEP_BUFFERS=0 to leave both as they are. Without glibc (macOS, musl) the allocator
is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

import jax

ENV_SWITCH = "RESSTREAM_REUSE_STEP_BUFFERS"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt(3) parameters, glibc's malloc.h


@functools.cache
def reuse_step_buffers() -> bool:
    """Keep freed host memory for reuse and run CPU programs synchronously (see the module
    docstring). True if glibc's allocator was set; False without glibc or with the switch off."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    jax.config.update("jax_cpu_enable_async_dispatch", False)  # read when the CPU backend starts
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (present in glibc only)
    except (OSError, AttributeError):
        return False
    return libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
