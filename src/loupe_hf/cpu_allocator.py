"""Keeping freed memory inside the process on glibc, so that a CPU training step does not page-fault.

PyTorch allocates CPU tensors with the C library's `malloc`. glibc hands allocations above its mmap
threshold straight to the kernel, and it returns the top of the heap to the kernel once more than
its trim threshold is free there. A training step allocates and frees the same few-megabyte
intermediates again and again, so every step can fault its working set back in page by page
(docs/design_choices.md has the measurements).

`keep_freed_memory()` raises both thresholds (mmap to glibc's largest, 32 MB; trimming off), which
removes those faults. The price: memory a step frees stays with the process until it exits, so
resident memory stays at its peak instead of falling between steps, and the setting holds for
everything else the process runs. Hence it is opt-in (`LoupeTrainingArguments.keep_freed_memory`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc caps the mmap threshold at HEAP_MAX_SIZE / 2: 32 MB on 64-bit systems.
LARGEST_MMAP_THRESHOLD = 32 * 1024 * 1024
NO_TRIMMING = 2**31 - 1  # mallopt takes a C int


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    library = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return library if hasattr(library, "mallopt") else None


def keep_freed_memory(
    mmap_threshold: int = LARGEST_MMAP_THRESHOLD, trim_threshold: int = NO_TRIMMING
) -> bool:
    """Sets glibc's mmap and trim thresholds for the whole process (see the module docstring).

    Args:
        mmap_threshold: allocations up to this many bytes come from the heap, whose freed memory is
            reused, instead of fresh kernel pages.
        trim_threshold: free bytes at the top of the heap before glibc returns them to the kernel.

    Returns:
        True when applied; False when the C library is not glibc (e.g. macOS, musl), where nothing
        is changed.
    """
    if not 0 < mmap_threshold <= LARGEST_MMAP_THRESHOLD:
        raise ValueError(
            f"mmap_threshold must be in (0, {LARGEST_MMAP_THRESHOLD}] bytes, got {mmap_threshold}"
        )
    if not 0 < trim_threshold <= NO_TRIMMING:
        raise ValueError(
            f"trim_threshold must be in (0, {NO_TRIMMING}] bytes, got {trim_threshold}"
        )
    library = _glibc()
    if library is None:
        return False
    # Both or neither: setting either one switches off glibc's dynamic mmap threshold, so the trim
    # threshold alone would map every allocation above 128 kB afresh.
    applied = library.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
    return applied and library.mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1


__all__ = ["keep_freed_memory"]
