"""Memory budgets: parsing sizes, what the machine (or its cgroup) allows, and peak RSS."""

from __future__ import annotations

import ctypes
import re
import resource
from pathlib import Path

import psutil

from .errors import InputError

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}

# Share of available memory taken by default, leaving room for the page cache and the rest of the machine.
DEFAULT_BUDGET_FRACTION = 0.5
# Default budget never exceeds this: beyond it larger row blocks stop paying off.
DEFAULT_BUDGET_CAP = 4 * 2**30


def parse_size(text: str | int) -> int:
    """Parse `512MiB`, `2GiB`, `500MB`, `5GB` or a plain byte count, as Hugging Face does."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match or match.group(2) not in _UNITS:
        raise InputError(f"size {text!r}: expected a number with an optional unit such as 512MiB, 2GiB, 500MB, 5GB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_size(n: float) -> str:
    """Render a byte count in binary units (`1.5 GiB`)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 or v1), if one is set."""
    candidates = [Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")]
    for path in candidates:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return int(text)
    return None


def available_memory() -> int:
    """Memory this process can use now: the machine's available memory, capped by a cgroup limit."""
    available = psutil.virtual_memory().available
    limit = _cgroup_limit()
    if limit is not None:
        available = min(available, max(0, limit - current_rss()))
    return available


def default_budget() -> int:
    """Half of the available memory (cgroup-aware), at most 4 GiB."""
    return min(int(available_memory() * DEFAULT_BUDGET_FRACTION), DEFAULT_BUDGET_CAP)


def current_rss() -> int:
    """Resident set size of this process now."""
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """Peak resident set size of this process so far (what `/usr/bin/time -v` reports).

    Linux's VmHWM is read first: `ru_maxrss` also counts the parent's memory at fork time when this
    process was started by a large one.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# glibc raises its mmap threshold each time a large block is freed, after which same-sized temporaries come
# from the heap and freed ones stay resident: measured 650 MiB peak instead of 270 MiB decoding NF4 in 1M
# element blocks. Fixing the threshold (any explicit value turns the adjustment off) keeps large
# temporaries in their own mappings, returned to the system when freed. 4 MiB was not low enough: a decoded
# bf16 block (2 MiB) and the decoder's per-block temporaries still came from the heap, interleaved with
# longer-lived allocations, and the NF4 -> bf16 merge of the 2gb model peaked at 521-581 MiB within
# `--max-memory 512MiB`; at 256 KiB it peaks at 397 MiB (two runs each).
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 10


def keep_heap_bounded() -> None:
    """Stop glibc's heap from growing with freed block-sized temporaries (no-op elsewhere)."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass
