"""glibc's allocator, set once per process so that freed memory serves the next call.

:func:`settle_heap` (every command calls it; ``ZOOMNET_MALLOC=0`` leaves glibc alone) sets
the thresholds glibc itself adapts to once it has freed a 32 MB block, from the start.
Until glibc has seen such a block it may map, unmap and trim the same few hundred kilobytes
at every call: inference on small views then runs its attention nets at up to half speed
in some processes and not in others, at random.

:func:`reuse_freed_memory` is an opt-in (``ZOOMNET_MALLOC=1``): every block up to 1 GiB
comes from the heap and freed memory at its top stays, so a training step's activations of
hundreds of megabytes are not mapped and zeroed afresh at every step. It is opt-in because
the heap fragments: torch asks for 64-byte-aligned blocks, so a freed block is a little too
small for the next request of the same size, and small blocks that stay alive between large
ones keep the gaps apart; resident memory grows over the first steps. Training on a CPU
gets most of the gain without it from its heap-sized chunks (:mod:`zoomnet.model.chunks`).

Both are process-wide and stay; elsewhere than glibc on Linux they do nothing.
"""

from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
_SETTINGS = (
    (_M_MMAP_THRESHOLD, 1 << 30),  # blocks up to 1 GiB come from the heap, not mmap
    (_M_TRIM_THRESHOLD, 2**31 - 1),  # free memory at the heap's top stays
    (_M_TOP_PAD, 256 << 20),  # the heap grows 256 MiB at a time (address space; pages come when touched)
)
# the thresholds glibc ends at once it has freed a 32 MB block (its dynamic mmap threshold
# never goes higher, and the trim threshold follows at twice that)
_STEADY = (
    (_M_MMAP_THRESHOLD, 32 << 20),  # blocks up to 32 MB come from the heap
    (_M_TRIM_THRESHOLD, 64 << 20),  # up to 64 MB free at the heap's top stay for the next call
)
_applied = False
_settled = False


def _setting() -> str:
    """``on``, ``off`` or ``""`` (not given), from ``ZOOMNET_MALLOC``."""
    given = os.environ.get("ZOOMNET_MALLOC", "").strip().lower()
    return "on" if given in ("1", "on", "true", "yes") else "off" if given in ("0", "off", "false", "no") else ""


def _apply(settings: tuple[tuple[int, int], ...]) -> bool:
    """Pass ``settings`` to glibc's ``mallopt``; True when every one took (never elsewhere)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in settings)


def settle_heap() -> bool:
    """Set glibc's allocator to the thresholds it adapts to by itself (``_STEADY``: blocks up
    to 32 MB from the heap, up to 64 MB kept at its top), so that repeated calls reuse the
    same pages from the first one; True when set. Once per process; nothing elsewhere than
    glibc, where ``ZOOMNET_MALLOC=1`` has set larger ones, or where ``ZOOMNET_MALLOC=0``
    (or ``off``) asks to leave glibc as it is.
    """
    global _settled
    if not (_settled or _applied) and _setting() != "off":
        _settled = _apply(_STEADY)
    return _settled


def reuse_freed_memory() -> bool:
    """Where ``ZOOMNET_MALLOC=1`` (or ``on``) is set, set glibc's allocator to keep freed
    blocks for reuse; True when it is so set. Idempotent.
    """
    global _applied
    if not _applied and _setting() == "on":
        _applied = _apply(_SETTINGS)
    return _applied
