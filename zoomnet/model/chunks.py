"""Running a net over many rows (views, sub-tiles): in chunks that keep glibc's heap reused
on a CPU, and padded to a few row counts off it.

glibc maps every block above its mmap threshold afresh and unmaps it when freed; the
threshold adapts to freed blocks but never beyond 32 MB (on 64-bit). So training on a CPU
runs ``f`` and the attention nets in chunks whose widest layer output stays under
``HEAP_BLOCK_BYTES``: those blocks come from the heap, and the next step reuses their pages
instead of having the kernel zero new ones. The chunks give the values and gradients of one
call. Nothing here changes the process's allocator (:mod:`zoomnet.runtime.allocator` does).

Off the CPU the number of rows a net gets varies with the draws (the distinct parents and
sub-tiles of a step), and every new batch size makes cuDNN and autocast plan anew (bf16 at
batch 1 took 338 ms a step on an H100 for that). :func:`padded` rounds the rows up to the
next of ``1, 2, 3, 4, 6, 8, 12, 16, 24, ...`` (at most a third more) with zero rows whose
outputs are dropped: the same values and gradients, a few dozen shapes in all. A net with
BatchNorm in training mode is never padded (the zero rows would enter its batch statistics).
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import nn

HEAP_BLOCK_BYTES = 24 << 20  # below glibc's largest mmap threshold (32 MB); 0: each net in one call
UNPADDED_DEVICES = ("cpu", "meta")  # where a new batch size costs no planning: rows go through as they are


_WIDEST: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def widest_output(net: nn.Module, fn: Callable, x: torch.Tensor) -> int:
    """Bytes of the largest output of any of ``net``'s layers when ``fn`` runs on one row of
    ``x``: measured once per net, row shape and dtypes, without gradients, in eval mode (no
    random numbers drawn)."""
    key = (tuple(x.shape[1:]), x.dtype, next(net.parameters(), x).dtype)
    seen = _WIDEST.setdefault(net, {})
    if key not in seen:
        sizes = [x[:1].numel() * x.element_size()]
        hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out.numel() * out.element_size())
                                         if isinstance(out, torch.Tensor) else None)
                 for m in net.modules() if not list(m.children())]
        modes = [(m, m.training) for m in net.modules()]
        try:
            with torch.no_grad():
                net.eval()
                fn(x[:1])
        finally:
            for h in hooks:
                h.remove()
            for m, mode in modes:
                m.training = mode
        seen[key] = max(sizes)
    return seen[key]


def rows_per_call(net: nn.Module, fn: Callable, x: torch.Tensor) -> int:
    """How many of ``x``'s rows (views or sub-tiles) one call of ``fn`` (which runs ``net``)
    takes in training on a CPU: as many as keep the widest output of ``net``'s layers under
    ``HEAP_BLOCK_BYTES``, so that glibc serves those blocks from the heap and the
    next step reuses their pages. Elsewhere (a GPU's caching allocator reuses memory by
    itself), at inference (which has its own chunks), and where that setting is 0: all."""
    limit = HEAP_BLOCK_BYTES
    if not limit or x.device.type != "cpu" or not torch.is_grad_enabled() or x.shape[0] < 2:
        return x.shape[0]
    return max(1, limit // widest_output(net, fn, x))


def bucket(rows: int) -> int:
    """The least of ``1, 2, 3, 4, 6, 8, 12, 16, 24, 32, ...`` (powers of two and 1.5 times
    them) at or above ``rows``."""
    if rows <= 4:
        return max(rows, 1)
    power = 1 << (rows - 1).bit_length()  # the power of two at or above rows
    return power * 3 // 4 if rows <= power * 3 // 4 else power


def _batch_statistics(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in net.modules())


def padded(net: nn.Module, fn: Callable, x: torch.Tensor):
    """``fn(x)`` (a tensor or a tuple of tensors, one row per row of ``x``), with ``x``'s rows
    padded to :func:`bucket`'s count by zero rows off the CPU and those rows' outputs
    dropped: the same values and gradients. Where ``fn`` gives the same tensor twice in a
    tuple, so does the result."""
    rows = x.shape[0]
    extra = bucket(rows) - rows
    if not extra or x.device.type in UNPADDED_DEVICES or _batch_statistics(net):
        return fn(x)
    out = fn(torch.cat([x, x.new_zeros(extra, *x.shape[1:])]))
    if not isinstance(out, tuple):
        return out[:rows]
    kept: dict[int, torch.Tensor] = {}
    return tuple(kept.setdefault(id(o), o[:rows]) for o in out)


def in_chunks(net: nn.Module, fn: Callable, x: torch.Tensor):
    """``fn(x)`` (a tensor, or a tuple of tensors, with one row per row of ``x``), computed in
    the chunks of :func:`rows_per_call`, each :func:`padded`: the same values and gradients.
    Where ``fn`` gives the same tensor twice in a tuple, so does the result."""
    rows = rows_per_call(net, fn, x)
    if rows >= x.shape[0]:
        return padded(net, fn, x)
    outs = [padded(net, fn, part) for part in x.split(rows)]
    if not isinstance(outs[0], tuple):
        return torch.cat(outs)
    result, joined = [], {}
    for parts in zip(*outs):
        key = tuple(map(id, parts))  # the same tensor in every chunk: joined once
        if key not in joined:
            joined[key] = torch.cat(parts)
        result.append(joined[key])
    return tuple(result)
