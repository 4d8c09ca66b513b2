"""Large CPU weight buffers backed by transparent huge pages (2 MiB) instead of 4 KiB pages.

Decode on the CPU streams GBs of expert weights per token; with 4 KiB pages every 4 KiB read can miss
the TLB. Linux gives an anonymous mapping huge pages when transparent huge pages (THP) are ``always``, or
when they are ``madvise`` (the usual default) and the range was marked ``MADV_HUGEPAGE`` before it was
first touched. :func:`empty` makes such a buffer: an anonymous mmap over-allocated by one huge page, its
2 MiB-aligned part marked with ``madvise``, wrapped as a tensor (``torch.frombuffer``; the tensor keeps the
mapping alive). Where THP is ``never``, off Linux, for buffers below one huge page, or when ``madvise``
fails, it is ``torch.empty``: same values, same results, 4 KiB pages. :func:`status` says which and why.
``MING_HUGE_PAGES=0`` turns it off (A/B measurements, bench/moe_layer_cpu.py --huge-pages).
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

HUGE_PAGE_BYTES = 2 << 20  # x86-64 and arm64 (4 KiB base pages) transparent huge page size
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# kernels with multi-size THP (6.8+) also have a setting per size; "inherit" follows THP_SETTING
THP_SIZE_SETTING = Path(f"/sys/kernel/mm/transparent_hugepage/hugepages-{HUGE_PAGE_BYTES >> 10}kB/enabled")
THP_MODES_USED = ("always", "madvise")  # modes in which MADV_HUGEPAGE gives huge pages
DISABLE_ENV = "MING_HUGE_PAGES"  # "0": plain torch.empty (4 KiB pages)

_enabled_override: bool | None = None  # set_enabled(): the benchmark's A/B switch


@dataclass(frozen=True)
class HugePageStatus:
    applies: bool
    reason: str  # why not, or the THP mode in use


def _bracketed(setting: Path) -> str | None:
    try:
        text = setting.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def thp_mode() -> str | None:
    """The THP mode for 2 MiB pages (``always`` / ``madvise`` / ``never``): the per-size setting where the
    kernel has one and it does not inherit, else the global one; None where neither exists."""
    size_mode = _bracketed(THP_SIZE_SETTING)
    return size_mode if size_mode not in (None, "inherit") else _bracketed(THP_SETTING)


def set_enabled(enabled: bool | None) -> None:
    """Force huge-page buffers on or off for buffers made from now on (None: back to the default)."""
    global _enabled_override
    _enabled_override = enabled


def status() -> HugePageStatus:
    """Whether :func:`empty` backs large buffers with huge pages here, and why not when it does not."""
    if _enabled_override is False or (_enabled_override is None and os.environ.get(DISABLE_ENV) == "0"):
        return HugePageStatus(False, f"turned off ({DISABLE_ENV}=0 or --huge-pages off)")
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return HugePageStatus(False, f"no transparent huge pages on {sys.platform}")
    mode = thp_mode()
    if mode not in THP_MODES_USED:
        return HugePageStatus(False, f"transparent huge pages are {mode or 'not available'} on this kernel "
                                     f"({THP_SETTING}, {THP_SIZE_SETTING.parent.name})")
    return HugePageStatus(True, f"transparent huge pages ({mode}), {HUGE_PAGE_BYTES >> 20} MiB")


def _aligned_mapping(nbytes: int) -> tuple[mmap.mmap, int]:
    """An anonymous mapping holding `nbytes` from a 2 MiB-aligned offset, that offset's whole huge pages
    marked MADV_HUGEPAGE (the tail below one huge page keeps 4 KiB pages: nothing is rounded up)."""
    # private: mmap's default for -1 is a shared mapping, which is shmem (shmem_enabled), not anonymous THP
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        address = _address(mapping)
        offset = -address % HUGE_PAGE_BYTES
        _advise_huge(mapping, offset, nbytes // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES)
    except BaseException:
        mapping.close()
        raise
    return mapping, offset


def _advise_huge(mapping: mmap.mmap, offset: int, length: int) -> None:
    mapping.madvise(mmap.MADV_HUGEPAGE, offset, length)


def _address(mapping: mmap.mmap) -> int:
    view = (ctypes.c_char * 1).from_buffer(mapping)
    try:
        return ctypes.addressof(view)
    finally:
        del view  # releases the buffer export, so the mapping can still be closed on failure


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype,
          device: torch.device | str | None = None) -> torch.Tensor:
    """An uninitialised contiguous tensor: on the CPU on 2 MiB-aligned huge pages where :func:`status` applies
    and it spans at least one huge page; else (another device, or when the kernel refuses madvise)
    ``torch.empty``. Fill it after this call: huge pages are given on first touch."""
    shape = tuple(shape)
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if (device is not None and torch.device(device).type != "cpu") or nbytes < HUGE_PAGE_BYTES \
            or not status().applies:
        return torch.empty(shape, dtype=dtype, device=device)
    try:
        mapping, offset = _aligned_mapping(nbytes)
    except (OSError, ValueError) as e:  # madvise refused (e.g. EINVAL on a kernel without THP): 4 KiB pages
        log.info("huge pages unavailable for a %d-byte buffer (%s); using 4 KiB pages", nbytes, e)
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.frombuffer(mapping, dtype=dtype, count=numel, offset=offset).view(shape)


def is_huge_page_aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % HUGE_PAGE_BYTES == 0


def anon_huge_page_bytes() -> int | None:
    """This process's AnonHugePages (bytes, /proc/self/smaps_rollup); None where unavailable."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
