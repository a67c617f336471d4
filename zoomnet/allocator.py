"""Keep freed memory in the process for the next call and the next training step.

Building a model sets glibc's thresholds to the values it adapts to by itself once it has
freed a 32 MB block (:func:`settle_heap`; ``ZOOMNET_MALLOC=0`` leaves glibc alone): the
same pages serve every call from the first. Without it, inference on the colon preset's
small views ran its attention nets at half speed in about a third of processes, at
random (the dynamic thresholds had not yet met a large block), and a ``needle-camelyon``
training step took 72-79 thousand page faults instead of 112 thousand (1.49 against 1.60 s,
medians of three alternated runs on the 2-core machine).

Training on a CPU also does this by itself: it runs the nets in chunks whose layer outputs stay
under ``HEAP_BLOCK_BYTES`` (below), which glibc serves from its heap and reuses. That alone
made a ``needle-camelyon`` step 2.1x faster than the one-parent-at-a-time code of a81fc15
(2.76 against 5.89 s on the idle 2-core machine; docs/benchmarks.md, "Heap-sized chunks"),
and the opt-in described next adds nothing on top of it. The opt-in stays for large
tensors outside those nets.

The opt-in (``ZOOMNET_MALLOC=1``):

glibc's ``malloc`` hands every block above its mmap threshold (at most 32 MB, and less
until it adapts) straight back to the kernel when it is freed. A training step allocates
and frees activations of hundreds of megabytes (f over thousands of sub-tiles), so every
step asks the kernel for the same memory again and touches it page by page: on the 2-core
development machine one ``needle-camelyon`` step (N = 200, B = 8) took 440,000 page faults
and 1.2 s of system time, over a quarter of the step (docs/benchmarks.md, "One training
step"), before the chunks. With the settings below the freed blocks stay in the heap and
are reused: that step took 1.4x less time on the idle machine (4.54 against 3.20 s).

It is opt-in (``ZOOMNET_MALLOC=1`` in the environment), because the heap fragments: torch
asks for 64-byte-aligned blocks, so a freed block is a little too small for the next
request of the same size, and small blocks that stay alive between large ones keep the
gaps apart. Over 16 such steps the resident memory grew from 1.5 to 2.2 GB, where without
the setting it stayed at 0.8-1.2 GB. Use it for runs that fit that growth. The settings
apply to the whole process and stay. Elsewhere than glibc on Linux this does nothing.
"""

from __future__ import annotations

import ctypes
import os
import platform

# glibc maps every block above its mmap threshold afresh and unmaps it when freed; the
# threshold adapts to freed blocks but never beyond 32 MB (on 64-bit). So training on a CPU
# runs f and the attention nets in chunks whose widest layer output stays under this size
# (zoomnet.model._rows_per_call; 0 runs each net in one call): those blocks come from the
# heap, and the next step reuses their pages instead of having the kernel zero new ones.
# Unlike the opt-in below, this leaves glibc's own trimming in place: the heap does not grow
# from step to step.
HEAP_BLOCK_BYTES = 24 << 20

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
_SETTINGS = (
    (_M_MMAP_THRESHOLD, 1 << 30),  # blocks up to 1 GiB come from the heap, not mmap
    (_M_TRIM_THRESHOLD, 2**31 - 1),  # free memory at the heap's top stays
    (_M_TOP_PAD, 256 << 20),  # the heap grows 256 MiB at a time (address space; pages come when touched)
)
# The default, set once a model is built (:func:`settle_heap`): the thresholds glibc itself
# ends at once it has freed a block of 32 MB (its dynamic mmap threshold never goes higher,
# and the trim threshold follows at twice that), from the start. Until then glibc adapts
# block by block, and where it has not yet seen a large block it can map, unmap and trim
# the same few hundred kilobytes at every call: the attention nets' 50x50 tile views of
# the colon preset (an im2col buffer of 720 kB each) took 2x their time in about a third
# of inference processes, at random (docs/benchmarks.md, "colon-cancer").
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
