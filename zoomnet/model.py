"""The Zoom-In network: K levels of attention sampling (Kong & Henao, CVPR 2022, Sec. 2).

K = 1 is one-stage attention sampling (ATS, Katharopoulos & Fleuret 2019); K = 2 is the
Zoom-In network. Level 1 looks at a low-resolution view of the whole image, draws N cells
with replacement and zooms into their regions; each deeper level looks at a view of each
distinct parent region, draws as many children as the parent was drawn (without
replacement), and the last level's regions (sub-tiles) are read at full resolution and fed
to the feature net ``f``. The aggregated feature ``z`` (the unbiased estimator of
``zoomnet.core.expectation``) goes to the classifier ``g``.

Shapes: B images, N draws, G cells of a grid, M parents at a level, L leaves (sub-tiles),
C channels, D feature size.

The model never opens files: it receives the level-1 views and one :class:`ImageSource`
per image, through which it reads every other view and sub-tile.
"""

from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import torch
import torch.utils.checkpoint
from torch import nn

from zoomnet import allocator
from zoomnet.core import expectation, sampling
from zoomnet.core.geometry import AxisPool, Box, cell_boxes, cells_in_image, edge_indices, grid_shape, pool_to_grid, pooling_plan, sum_to_grid
from zoomnet.config.model import LevelConfig, ModelConfig, with_legacy_fields  # noqa: F401 (re-exported)
from zoomnet.core.tissue import tissue_map
from zoomnet.nets import available, build
from zoomnet.nets.registry import resolve
from zoomnet.nets.features import PreActBlock
from zoomnet.core.source import ImageSource, read_many


def _restrict(log_p: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Renormalise ``(B, G)`` log-probabilities over the allowed cells.

    Excluded cells get :data:`sampling.LEFT_OUT` before renormalising: very negative but
    finite, so that the surrogate ``p / sg(p)`` stays 1 (not NaN) where they are never
    drawn.
    """
    masked = log_p.masked_fill(~allowed, sampling.LEFT_OUT)
    return masked - torch.logsumexp(masked, dim=1, keepdim=True)


def _repeat_edges(views: torch.Tensor, boxes: Sequence[Box], height: int, width: int) -> torch.Tensor:
    """``(M, C, h, w)`` views of ``boxes`` with their pixels outside the image replaced by
    the image's edge (:func:`edge_indices`); the views themselves where none sticks out."""
    if all(b.top >= 0 and b.left >= 0 and b.top + b.height <= height and b.left + b.width <= width for b in boxes):
        return views
    found = edge_indices(torch.tensor([tuple(b) for b in boxes], dtype=torch.long), views.shape[-2:], height, width)
    if found is None:
        return views
    rows, cols = (i.to(views.device) for i in found)
    m, c, h, w = views.shape
    views = views.gather(2, rows[:, None, :, None].expand(m, c, h, w))
    return views.gather(3, cols[:, None, None, :].expand(m, c, h, w))


def _attend(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An attention net's ``(M, h, w)`` logits and their learnt part (the same tensor for a
    net without a prior, e.g. one registered by a user)."""
    if getattr(net, "prior_gain", None) is not None:
        return net(x, split=True)
    logits = net(x)
    return logits, logits


_WIDEST: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _widest_output(net: nn.Module, fn: Callable, x: torch.Tensor) -> int:
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


def _rows_per_call(net: nn.Module, fn: Callable, x: torch.Tensor) -> int:
    """How many of ``x``'s rows (views or sub-tiles) one call of ``fn`` (which runs ``net``)
    takes in training on a CPU: as many as keep the widest output of ``net``'s layers under
    ``allocator.HEAP_BLOCK_BYTES``, so that glibc serves those blocks from the heap and the
    next step reuses their pages. Elsewhere (a GPU's caching allocator reuses memory by
    itself), at inference (which has its own chunks), and where that setting is 0: all."""
    limit = allocator.HEAP_BLOCK_BYTES
    if not limit or x.device.type != "cpu" or not torch.is_grad_enabled() or x.shape[0] < 2:
        return x.shape[0]
    return max(1, limit // _widest_output(net, fn, x))


def _in_chunks(net: nn.Module, fn: Callable, x: torch.Tensor):
    """``fn(x)`` (a tensor, or a tuple of tensors, with one row per row of ``x``), computed in
    the chunks of :func:`_rows_per_call`: the same values and gradients. Where ``fn`` gives
    the same tensor twice in a tuple, so does the result."""
    rows = _rows_per_call(net, fn, x)
    if rows >= x.shape[0]:
        return fn(x)
    outs = [fn(part) for part in x.split(rows)]
    if not isinstance(outs[0], tuple):
        return torch.cat(outs)
    result, joined = [], {}
    for parts in zip(*outs):
        key = tuple(map(id, parts))  # the same tensor in every chunk: joined once
        if key not in joined:
            joined[key] = torch.cat(parts)
        result.append(joined[key])
    return tuple(result)


def read_boxes(
    sources: Sequence[ImageSource], keys: Sequence[tuple[int, Box]], out_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """``(M, C, h, w)`` pixels of ``(image, box)`` keys, in key order, read image by image
    (one :func:`read_many` per image: one crop-and-resample pass where the source has it)."""
    rows: dict[int, list[int]] = {}
    for i, (b, _) in enumerate(keys):
        rows.setdefault(b, []).append(i)
    parts = [read_many(sources[b], [keys[i][1] for i in idx], out_size) for b, idx in rows.items()]
    stacked = torch.cat(parts) if len(parts) > 1 else parts[0]
    order = [i for idx in rows.values() for i in idx]
    if order == list(range(len(keys))):
        return stacked
    out = torch.empty_like(stacked)
    out[torch.tensor(order)] = stacked
    return out


def view_size(scale: float, height: int, width: int) -> tuple[int, int]:
    """Size of the view of a ``height x width`` region at ``scale`` (at least one pixel)."""
    return max(1, math.floor(scale * height)), max(1, math.floor(scale * width))


@dataclass
class Sample:
    """One drawn region: its box, how often it was drawn, and its (detached) path weight."""

    box: Box
    count: int
    weight: float
    cell: int


@dataclass
class LevelTrace:
    """What one level looked at, per image.

    Attributes:
        maps: per image, ``{parent box: (G,) probabilities}`` (level 1: the whole image).
        grid: ``(g_h, g_w)`` of this level's maps (level 1: of the last image's size).
        samples: per image, the regions drawn at this level.
    """

    maps: list[dict[Box, torch.Tensor]]
    grid: tuple[int, int]
    samples: list[list[Sample]]


@dataclass
class ZoomInOutput:
    """Logits and what the model looked at.

    Attributes:
        logits: ``(B, num_classes)``.
        z: ``(B, D)`` aggregated features.
        levels: one :class:`LevelTrace` per level.
        log_maps: per level, per image, the ``(M, G)`` log-probability maps (with gradient;
            used by the entropy regularizer and mask supervision).
        parents: per level, per image, the parent boxes of those maps.
        leaf_features: ``(L, D)`` features of the distinct sub-tiles (training only).
        leaf_image: ``(L,)`` image index of each leaf.
        leaf_boxes: the leaves' boxes.
        leaf_paths: per leaf, ``(image, parent box, cell)`` at every level.
        cell_logits: per level, ``{(image, parent box): (G,) raw cell logits}`` of the
            attention nets' learnt part, without the contrast prior (with gradient).
        contrastive_logits: ``(B, num_classes)`` from the complementary sample, if asked.
    """

    logits: torch.Tensor
    z: torch.Tensor
    levels: list[LevelTrace]
    log_maps: list[list[torch.Tensor]]
    parents: list[list[list[Box]]]
    leaf_features: torch.Tensor | None = None
    leaf_image: torch.Tensor | None = None
    leaf_boxes: list[Box] = field(default_factory=list)
    leaf_paths: list[tuple[tuple[int, Box, int], ...]] = field(default_factory=list)
    cell_logits: list[dict[tuple[int, Box], torch.Tensor]] = field(default_factory=list)
    contrastive_logits: torch.Tensor | None = None


class LevelGrid(NamedTuple):
    """The geometry of one level for parents of one size.

    Attributes:
        view: ``(h, w)`` of a parent's view.
        grid: ``(g_h, g_w)`` cells.
        rows, cols: how view pixels pool into cells, per axis (None: one pixel a cell).
        rel: ``(G, 4)`` cell boxes relative to the parent's top-left corner.
    """

    view: tuple[int, int]
    grid: tuple[int, int]
    rows: AxisPool | None
    cols: AxisPool | None
    rel: torch.Tensor


class CellTable:
    """Per-parent rows of one level, ``{(image, parent box): (G,) tensor}``, stored as the
    ``(M, G)`` blocks the attention net produced, so that many rows are gathered with one
    tensor operation (:meth:`rows`, :meth:`flat_index`) instead of one per row. Reads like
    a dict: ``key in table``, ``table[key]``, iteration over the keys in insertion order."""

    def __init__(self) -> None:
        self.index: dict[tuple[int, Box], int] = {}
        self._blocks: list[torch.Tensor] = []
        self._table: torch.Tensor | None = None

    def add(self, keys: Sequence[tuple[int, Box]], block: torch.Tensor) -> None:
        """Append the rows of ``block`` ``(len(keys), G)`` under new keys."""
        for key in keys:
            self.index[key] = len(self.index)
        self._blocks.append(block)
        self._table = None

    def table(self) -> torch.Tensor:
        """Every row, ``(M, G)``, in insertion order."""
        if not self._blocks:
            raise KeyError("no rows yet")
        if self._table is None:
            self._table = self._blocks[0] if len(self._blocks) == 1 else torch.cat(self._blocks)
        return self._table

    def rows(self, keys: Sequence[tuple[int, Box]]) -> torch.Tensor:
        """``(len(keys), G)``: the rows of ``keys``, gathered in one operation."""
        positions = [self.index[k] for k in keys]
        if positions == list(range(len(self.index))):  # every row, in order: the table itself
            return self.table()
        idx = torch.tensor(positions, dtype=torch.long, device=self.table().device)
        return self.table().index_select(0, idx)

    def flat_index(self, cells: Sequence[tuple[tuple[int, Box], int]]) -> torch.Tensor:
        """Positions in ``table().flatten()`` of ``(key, cell)`` pairs."""
        width = self.table().shape[1]
        return torch.tensor([self.index[key] * width + cell for key, cell in cells], device=self.table().device)

    def __contains__(self, key) -> bool:
        return key in self.index

    def __getitem__(self, key) -> torch.Tensor:
        return self.table()[self.index[key]]

    def __iter__(self):
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


@dataclass
class _Nodes:
    """The regions drawn at one level, as parallel lists and one tensor of path weights."""

    image: list[int]
    box: list[Box]
    weight: torch.Tensor  # (M,) path weights, with gradient
    count: list[int]
    cell: list[int]
    path: list[tuple[tuple[int, Box, int], ...]]  # (image, parent box, cell) at each level


class ZoomIn(nn.Module):
    """K-level attention sampling (K = 1: ATS; K = 2: Zoom-In).

    >>> import numpy as np
    >>> from zoomnet.sources import ArraySource
    >>> cfg = ModelConfig(levels=[LevelConfig(0.125, (64, 64)), LevelConfig(0.5, (16, 16), "dense")])
    >>> model = ZoomIn(cfg).eval()
    >>> src = ArraySource(np.zeros((128, 128, 3), dtype=np.uint8))
    >>> out = model.predict([src], generator=torch.Generator().manual_seed(0))
    >>> out.logits.shape
    torch.Size([1, 2])
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        allocator.settle_heap()  # the same pages for every call from the first (zoomnet.allocator)
        self.config = config
        c = len(config.pixel_mean)
        def attention_net(name: str) -> nn.Module:
            # a user's attention net need not know the prior, the depth or the head: it gets
            # those of them it takes
            takes = inspect.signature(resolve("attention", name)).parameters
            extra = {"prior": config.attention_prior} if config.attention_prior and "prior" in takes else {}
            extra.update({k: v for k, v in (("depth", config.attention_depth), ("head", config.attention_head)) if k in takes})
            return build("attention", name, in_channels=c, width=config.attention_width, **extra)

        self.attention = nn.ModuleList(attention_net(lv.attention) for lv in config.levels)
        self.feature = build("feature", config.feature, in_channels=c, **config.feature_kwargs)
        self.classifier = build(
            "classifier", "linear", in_dim=self.feature.out_dim,
            num_classes=config.num_classes, scale=config.classifier_scale,
        )
        self.register_buffer("mean", torch.tensor(config.pixel_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.pixel_std).view(1, -1, 1, 1), persistent=False)
        self._grids: dict[tuple[int, int, int], LevelGrid] = {}
        self._centre_spans: dict[tuple[int, int, int], tuple[float, ...]] = {}

    # ------------------------------------------------------------------ geometry helpers
    def _level_grid(self, level: int, parent_hw: tuple[int, int]) -> LevelGrid:
        """The cached :class:`LevelGrid` of one level for parents of ``parent_hw``."""
        key = (level, *parent_hw)
        if key not in self._grids:
            with torch.inference_mode(False), torch.no_grad():  # built in predict, used in training too
                self._grids[key] = self._build_grid(level, parent_hw)
        return self._grids[key]

    def _build_grid(self, level: int, parent_hw: tuple[int, int]) -> LevelGrid:
        lv = self.config.levels[level]
        stride = lv.cell_stride()
        vs = view_size(lv.scale, *parent_hw)
        rows, cols = pooling_plan(vs, parent_hw, stride)
        rel = cell_boxes(Box(0, 0, *parent_hw), stride, lv.region)  # (G, 4)
        return LevelGrid(vs, grid_shape(*parent_hw, stride), rows, cols, rel)

    def _cells_in_image(
        self, level: int, parent_hw: tuple[int, int], parents: Sequence[Box], height: int, width: int
    ) -> torch.Tensor | None:
        """``(M, G)`` cells of these parents that may be drawn (:func:`cells_in_image`), or
        None where every cell may."""
        g = self._level_grid(level, parent_hw)
        key = (level, *parent_hw)
        if key not in self._centre_spans:  # the span of the cells' centres, relative to the parent
            c = g.rel[:, :2].double() + g.rel[:, 2:].double() / 2
            self._centre_spans[key] = (*c.amin(0).tolist(), *c.amax(0).tolist())
        y0, x0, y1, x1 = self._centre_spans[key]
        if all(b.top + y0 >= 0 and b.left + x0 >= 0 and b.top + y1 < height and b.left + x1 < width for b in parents):
            return None  # every cell centred inside: all drawable, no tensor work
        corners = torch.tensor([(b.top, b.left) for b in parents], dtype=torch.long).view(-1, 2)
        allowed = cells_in_image(corners, g.rel, g.grid, height, width)
        return None if bool(allowed.all()) else allowed

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Raw pixels ``(M, C, h, w)`` -> network input (in the model's dtype and
        :func:`conv_layout`)."""
        return conv_layout(((pixels.to(self.mean.device) - self.mean) / self.std).to(self.mean.dtype))

    def views_in_strips(self, height: int, width: int) -> bool:
        """Whether the level-1 view of an image of this size is read and run in strips
        (``strip_rows``): such a view is never held whole, so nobody reads it ahead."""
        rows = view_size(self.config.levels[0].scale, height, width)[0]
        return bool(self.config.strip_rows) and rows > self.config.strip_rows

    def read_views(self, sources: Sequence[ImageSource]) -> torch.Tensor:
        """Level-1 views ``(B, C, h, w)`` of same-sized images, read through their sources."""
        sizes = {(s.height, s.width) for s in sources}
        if len(sizes) != 1:
            raise ValueError(f"images of one batch must share a size, got {sorted(sizes)}")
        (height, width), = sizes
        vs = view_size(self.config.levels[0].scale, height, width)
        return torch.stack([s.read(Box(0, 0, height, width), vs) for s in sources])

    def _attention_maps(
        self, level: int, views: torch.Tensor, parent_hw: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, C, h, w)`` raw views -> ``(M, G)`` log-probabilities and raw logits of the cells."""
        return self._cell_maps(*self._cell_logits(level, views, parent_hw))

    def _cell_logits(
        self, level: int, views: torch.Tensor, parent_hw: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, C, h, w)`` raw views -> ``(M, G)`` cell logits (the attention net's pixel
        logits pooled into the level's cells) and those of the learnt part alone."""
        g = self._level_grid(level, parent_hw)
        net = self.attention[level]
        logits, learned = _in_chunks(net, lambda v: _attend(net, self.normalize(v)), views)  # (M, h, w) each
        cell_logits = pool_to_grid(logits, g.rows, g.cols)  # (M, G)
        # the learnt part alone feeds attention distillation, a training term: inference skips it
        if learned is logits or not torch.is_grad_enabled():
            return cell_logits, cell_logits
        return cell_logits, pool_to_grid(learned, g.rows, g.cols)

    def _cell_maps(self, cell_logits: torch.Tensor, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, G)`` cell logits -> their smoothed log-probabilities and the raw logits, in
        float32 (or float64): the estimator and losses stay out of autocast's precision."""
        cell_logits = cell_logits.to(torch.promote_types(cell_logits.dtype, torch.float32))
        return sampling.smoothed_log_softmax(cell_logits, self.config.smooth), raw.to(cell_logits.dtype)

    def _level1_in_strips(
        self, sources: Sequence[ImageSource]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Level-1 attention of large views, read and run in horizontal strips; also the
        tissue maps of the views when ``tissue_mask`` is on.

        Each strip of ``strip_rows`` view rows is read with a halo of the attention net's
        receptive-field radius above and below, so its own rows get exactly the logits of
        a whole-view pass; only one strip's pixels and activations are alive at a time (in
        training the strip's activations are recomputed in the backward pass).
        """
        height, width = sources[0].height, sources[0].width
        vh, vw = view_size(self.config.levels[0].scale, height, width)
        net = self.attention[0]
        halo = getattr(net, "halo", 3)
        step = self.config.strip_rows
        rows_per_px = height / vh  # full-resolution rows per view row
        # the learnt part differs from the logits (and is needed for distillation, in training)
        split = getattr(net, "prior_gain", None) is not None and torch.is_grad_enabled()
        maps, raws, tissue = [], [], []
        for src in sources:
            logits, learned, tissue_rows = [], [], []
            for r0 in range(0, vh, step):
                r1 = min(vh, r0 + step)
                a0, a1 = max(0, r0 - halo), min(vh, r1 + halo)
                top, bottom = round(a0 * rows_per_px), round(a1 * rows_per_px)
                strip = src.read(Box(top, 0, bottom - top, width), (a1 - a0, vw))[None]  # (1, C, a1-a0, vw)
                x = self.normalize(strip)
                if torch.is_grad_enabled():
                    out, own = torch.utils.checkpoint.checkpoint(_attend, net, x, use_reentrant=False)
                else:
                    out, own = _attend(net, x)
                logits.append(out[:, r0 - a0 : r1 - a0])  # (1, r1-r0, vw)
                learned.append(own[:, r0 - a0 : r1 - a0])
                if self.config.tissue_mask:
                    tissue_rows.append(strip[0, :, r0 - a0 : r1 - a0])  # (C, r1-r0, vw) raw
            full = torch.cat(logits, dim=1)  # (1, vh, vw)
            if self.config.tissue_mask:
                tissue.append(tissue_map(torch.cat(tissue_rows, dim=1)))
            g = self._level_grid(0, (height, width))
            cell = pool_to_grid(full, g.rows, g.cols)
            log_p, raw = self._cell_maps(cell, pool_to_grid(torch.cat(learned, dim=1), g.rows, g.cols) if split else cell)
            maps.append(log_p)
            raws.append(raw)
        return torch.cat(maps), torch.cat(raws), (torch.stack(tissue) if tissue else None)

    def _tissue_cells(self, tissue: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``(B, v_h, v_w)`` bool tissue maps -> ``(B, G1)`` bool: cells holding any tissue."""
        g = self._level_grid(0, (height, width))
        rows, cols = g.rows, g.cols
        t = tissue.float()
        cells = (t.flatten(1) if rows is None else sum_to_grid(t, rows, cols).flatten(1)) > 0  # (B, G1)
        cells[~cells.any(dim=1)] = True  # never hide a whole image
        return cells.to(self.mean.device)

    # ------------------------------------------------------------------ the hierarchy
    def _descend(
        self,
        log_alpha: torch.Tensor,
        sources: Sequence[ImageSource],
        n: int,
        deterministic: bool,
        generator: torch.Generator | None,
        cache: list[CellTable],
        logit_cache: list[CellTable],
        transform: Callable[[torch.Tensor], torch.Tensor] | None,
        record: list[LevelTrace] | None,
        cell_mask: torch.Tensor | None = None,
    ) -> _Nodes:
        """Sample down the hierarchy; return the leaves with their path weights.

        Every level is one batch of tensor operations over all its parents (draws, weights
        and path products), whatever the number of images and parents; Python only keeps the
        boxes."""
        B = log_alpha.shape[0]
        height, width = sources[0].height, sources[0].width
        la = transform(log_alpha) if transform else log_alpha  # (B, G1)
        if transform and cell_mask is not None:  # the complement of a masked map stays masked
            la = _restrict(la, cell_mask)
        if deterministic:
            counts = sampling.largest_remainder_counts(la, n)
        else:
            counts = sampling.sample_with_replacement(la, n, generator)  # (B, G1)
        weights = expectation.with_replacement_weights(la, counts.to(la.device))  # (B, G1)
        rel = self._level_grid(0, (height, width)).rel
        whole = Box(0, 0, height, width)
        counts = counts.cpu()
        drawn = torch.nonzero(counts)  # (M, 2): (image, cell), image by image
        images, cells = drawn[:, 0].tolist(), drawn[:, 1].tolist()
        nodes = _Nodes(
            images, [Box(*r) for r in rel[drawn[:, 1]].tolist()],
            weights[drawn[:, 0].to(la.device), drawn[:, 1].to(la.device)],
            counts[drawn[:, 0], drawn[:, 1]].tolist(), cells,
            [((b, whole, c),) for b, c in zip(images, cells)],
        )
        if record is not None:
            record[0].samples = self._samples_of(nodes, B)

        for level in range(1, len(self.config.levels)):
            parent_hw = tuple(self.config.levels[level - 1].region)
            geometry = self._level_grid(level, parent_hw)
            vs, rel = geometry.view, geometry.rel
            keys = list(zip(nodes.image, nodes.box))
            missing = list(dict.fromkeys(k for k in keys if k not in cache[level]))
            # inference: the memory of one chunk; training keeps every chunk's activations for
            # the backward pass anyway, so its views go through the net in one call
            step = self.config.view_chunk if not torch.is_grad_enabled() else max(len(missing), 1)
            pieces = []  # cell logits, chunk by chunk: small beside the net's activations
            for start in range(0, len(missing), step):
                part = missing[start : start + step]
                views = _repeat_edges(read_boxes(sources, part, vs), [box for _, box in part], height, width)
                pieces.append(self._cell_logits(level, views, parent_hw))  # (M, G) each
            if missing:  # normalised and restricted for every missing parent at once
                maps, raw = self._cell_maps(*(torch.cat(p) if len(pieces) > 1 else p[0] for p in zip(*pieces)))
                allowed = self._cells_in_image(level, parent_hw, [box for _, box in missing], height, width)
                if allowed is not None:  # cells that would show the fill outside the image
                    maps = _restrict(maps, allowed.to(maps.device))
                cache[level].add(missing, maps)
                logit_cache[level].add(missing, raw)
            log_beta = cache[level].rows(keys)  # (M, G)
            allowed = self._cells_in_image(level, parent_hw, nodes.box, height, width)
            if transform:
                log_beta = transform(log_beta)
                if allowed is not None:  # the complement of a restricted map stays restricted
                    log_beta = _restrict(log_beta, allowed.to(log_beta.device))
            G = log_beta.shape[1]
            # draws per parent: its multiplicity, at most its drawable cells (Python numbers
            # where every cell is drawable: no tensor work for a few small integers)
            cells = [G] * len(keys) if allowed is None else allowed.sum(dim=1).tolist()  # drawable
            k_list = [min(c, n) for c, n in zip(nodes.count, cells)]
            takes_all = [k_i == n for k_i, n in zip(k_list, cells)]
            exact = torch.tensor(takes_all) if any(takes_all) else None
            k, k_max = torch.tensor(k_list), max(k_list)  # (M,)
            if deterministic:
                order = sampling.top_k_children(log_beta, k_max)  # (M, k_max)
            else:
                order = sampling.sample_without_replacement(log_beta, k_max, generator)
            order = order.to(log_beta.device)
            w = expectation.without_replacement_weights(log_beta, order, k)  # (M, k_max)
            if exact is not None:  # a parent drawn as often as it has cells takes every one: the exact sum
                every = torch.arange(G).expand(len(keys), G)
                if allowed is not None:  # drawable cells first, in index order
                    every = torch.sort((~allowed).to(torch.uint8), dim=1, stable=True).indices
                every = every[:, :k_max].to(log_beta.device)
                ex = exact.to(log_beta.device)[:, None]
                order = torch.where(ex, every, order)
                w = torch.where(ex, expectation.exact_weights(log_beta).gather(1, every), w)
            # the first k of each parent's draws, row by row, in draw order
            parents = [i for i, n_i in enumerate(k_list) for _ in range(n_i)]
            rows, cols = torch.tensor(parents), torch.tensor([j for n_i in k_list for j in range(n_i)])
            child_w = (nodes.weight[:, None] * w)[rows.to(w.device), cols.to(w.device)]
            draws = order.cpu()[rows, cols]
            rel_draws = rel[draws].tolist()
            draws = draws.tolist()
            nodes = _Nodes(
                [nodes.image[i] for i in parents],
                [Box(nodes.box[i].top + t, nodes.box[i].left + l, h, ww) for i, (t, l, h, ww) in zip(parents, rel_draws)],
                child_w, [1] * len(parents), draws,
                [nodes.path[i] + ((nodes.image[i], nodes.box[i], c),) for i, c in zip(parents, draws)],
            )
            if record is not None:
                record[level].samples = self._samples_of(nodes, B)
        return nodes

    @staticmethod
    def _samples_of(nodes: _Nodes, batch: int) -> list[list[Sample]]:
        out: list[list[Sample]] = [[] for _ in range(batch)]
        for b, box, count, w, cell in zip(nodes.image, nodes.box, nodes.count, nodes.weight.detach().tolist(), nodes.cell):
            out[b].append(Sample(box, count, w, cell))
        return out

    def _aggregate(
        self, leaves: _Nodes, sources: Sequence[ImageSource], batch: int, keep: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, list[Box], list[tuple]]:
        """``z = sum_leaves W f(leaf)``; each distinct sub-tile read and embedded once."""
        slot: dict[tuple[int, Box], int] = {}
        leaf_paths: list[tuple] = []
        for key, path in zip(zip(leaves.image, leaves.box), leaves.path):
            if key not in slot:
                slot[key] = len(slot)
                leaf_paths.append(path)
        keys = list(slot)
        where = torch.tensor([slot[k] for k in zip(leaves.image, leaves.box)], device=leaves.weight.device)
        # a sub-tile reached along several paths (overlapping parents) sums its weights
        weights = leaves.weight.new_zeros(len(keys)).index_add(0, where, leaves.weight)  # (L,)
        image = torch.tensor([b for b, _ in keys], device=weights.device)  # (L,)
        D = self.feature.out_dim
        z = torch.zeros(batch, D, device=self.mean.device, dtype=weights.dtype)
        if keep:  # training: one pass, features kept for the graph and the instance loss
            pixels = read_boxes(sources, keys)  # (L, C, h, w)
            # float32 under autocast too: the classifier and the instance loss take them outside it
            feats = _in_chunks(self.feature, lambda p: self.feature(self.normalize(p)), pixels).to(weights.dtype)  # (L, D)
            z = z.index_add(0, image, weights[:, None] * feats)
            return z, feats, image, [box for _, box in keys], leaf_paths
        for start in range(0, len(keys), self.config.chunk):  # inference: memory of one chunk
            part = keys[start : start + self.config.chunk]
            pixels = read_boxes(sources, part)
            feats = self.feature(self.normalize(pixels))  # (chunk, D)
            sl = slice(start, start + len(part))
            z = z.index_add(0, image[sl], weights[sl, None] * feats.to(weights.dtype))
        return z, None, image, [box for _, box in keys], leaf_paths

    def forward(
        self,
        sources: Sequence[ImageSource],
        views: torch.Tensor | None = None,
        *,
        samples: int | None = None,
        deterministic: bool = False,
        contrastive: bool = False,
        generator: torch.Generator | None = None,
    ) -> ZoomInOutput:
        """Run the hierarchy on a batch of same-sized images.

        Args:
            sources: one image source per image (the model reads every region through it).
            views: ``(B, C, h, w)`` level-1 views in raw pixel values (read if None).
            samples: level-1 draws N (default: ``train_samples`` in training mode,
                ``samples`` otherwise).
            deterministic: largest-remainder counts and top-k children instead of sampling.
            contrastive: also aggregate a sample from the complementary distributions.
            generator: random source of every draw.
        """
        cfg = self.config
        B = len(sources)
        n = samples or (cfg.train_samples if self.training and cfg.train_samples else cfg.samples)
        height, width = sources[0].height, sources[0].width
        tissue = None
        if views is None and self.views_in_strips(height, width):
            log_alpha, raw_alpha, tissue = self._level1_in_strips(sources)  # (B, G1) each
        else:
            if views is None:
                views = self.read_views(sources)
            log_alpha, raw_alpha = self._attention_maps(0, views, (height, width))  # (B, G1) each
            if cfg.tissue_mask:
                tissue = torch.stack([tissue_map(v) for v in views.cpu()])
        cell_mask = self._tissue_cells(tissue, height, width) if tissue is not None else None
        inside = self._cells_in_image(0, (height, width), [Box(0, 0, height, width)], height, width)
        if inside is not None:  # tiles that stick out of the image far enough to miss it
            inside = inside.to(log_alpha.device).expand(B, -1)
            cell_mask = inside if cell_mask is None else cell_mask & inside
        if cell_mask is not None:
            log_alpha = _restrict(log_alpha, cell_mask)
        grid1 = self._level_grid(0, (height, width)).grid
        whole = Box(0, 0, height, width)
        traces = [LevelTrace([{whole: log_alpha[b].detach().exp()} for b in range(B)], grid1, [])]
        for level in range(1, len(cfg.levels)):
            grid = self._level_grid(level, tuple(cfg.levels[level - 1].region)).grid
            traces.append(LevelTrace([{} for _ in range(B)], grid, []))
        cache = [CellTable() for _ in cfg.levels]
        logit_cache = [CellTable() for _ in cfg.levels]
        logit_cache[0].add([(b, whole) for b in range(B)], raw_alpha)
        leaves = self._descend(
            log_alpha, sources, n, deterministic, generator, cache, logit_cache, None, traces
        )
        keep = torch.is_grad_enabled()
        z, feats, image, boxes, leaf_paths = self._aggregate(leaves, sources, B, keep)
        logits = self.classifier(z)  # (B, num_classes)

        log_maps: list[list[torch.Tensor]] = [[log_alpha[b : b + 1] for b in range(B)]]
        parents: list[list[list[Box]]] = [[[whole] for _ in range(B)]]
        for level in range(1, len(cfg.levels)):
            per_image_maps, per_image_parents = [], []
            for b in range(B):
                keys = [key for key in cache[level] if key[0] == b]
                per_image_parents.append([box for _, box in keys])
                rows = cache[level].rows(keys) if keys else log_alpha.new_zeros(0, 1)
                per_image_maps.append(rows)
                # one operation per image, not one per parent
                traces[level].maps[b] = dict(zip([box for _, box in keys], rows.detach().exp().unbind(0)))
            log_maps.append(per_image_maps)
            parents.append(per_image_parents)

        out = ZoomInOutput(
            logits=logits, z=z, levels=traces, log_maps=log_maps, parents=parents, leaf_features=feats,
            leaf_image=image, leaf_boxes=boxes, leaf_paths=leaf_paths, cell_logits=logit_cache,
        )
        if contrastive:
            c_leaves = self._descend(
                log_alpha, sources, n, deterministic, generator, cache, logit_cache,
                sampling.complement_log_probs, None, cell_mask,
            )
            c_z, *_ = self._aggregate(c_leaves, sources, B, keep)
            out.contrastive_logits = self.classifier(c_z)
        return out

    @torch.inference_mode()
    def predict(self, sources: Sequence[ImageSource], **kwargs) -> ZoomInOutput:
        """Inference without gradients: ``f`` runs over the sub-tiles in chunks.

        It runs in inference mode (no autograd bookkeeping at all: 6 % less time an image in
        the colon setting than under ``no_grad``), so the output's tensors are inference
        tensors: read them, compute from them, or ``clone()`` them before changing them in
        place outside inference mode."""
        if not any(m.training for m in self.modules()):  # already in eval mode: nothing to switch
            return self(sources, **kwargs)
        was = self.training
        self.eval()
        try:
            return self(sources, **kwargs)
        finally:
            self.train(was)


class CNNBaseline(nn.Module):
    """A plain CNN on the whole image (optionally downsampled), global max pooling, linear.

    The reference the paper compares with (its "ResNet with 8 convolutional layers and 32
    channels"): a stride-2 stem and three pre-activation blocks of 32 channels (seven 3x3
    and two 1x1 convolutions). It reads every pixel of the (scaled) image.
    """

    def __init__(self, config: ModelConfig, width: int = 32):
        super().__init__()
        self.config = config
        c = len(config.pixel_mean)
        self.body = nn.Sequential(
            nn.Conv2d(c, width, 3, stride=2, padding=1, bias=False),
            PreActBlock(width, width, 1), PreActBlock(width, width, 2), PreActBlock(width, width, 2),
            nn.GroupNorm(8, width), nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(width, config.num_classes)
        self.register_buffer("mean", torch.tensor(config.pixel_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.pixel_std).view(1, -1, 1, 1), persistent=False)

    def read_views(self, sources: Sequence[ImageSource]) -> torch.Tensor:
        h, w = sources[0].height, sources[0].width
        size = view_size(self.config.cnn_scale, h, w)
        return torch.stack([s.read(Box(0, 0, h, w), None if size == (h, w) else size) for s in sources])

    def forward(self, sources: Sequence[ImageSource], views: torch.Tensor | None = None, **_) -> ZoomInOutput:
        if views is None:
            views = self.read_views(sources)
        x = conv_layout((views.to(self.mean.device) - self.mean) / self.std)  # (B, C, h, w)
        feats = self.body(x).amax(dim=(2, 3))  # (B, width): global max pooling
        return ZoomInOutput(logits=self.head(feats), z=feats, levels=[], log_maps=[], parents=[])

    predict = ZoomIn.predict


def conv_layout(x: torch.Tensor) -> torch.Tensor:
    """A network input ``(M, C, h, w)`` in the memory layout its convolutions run fastest in.

    On a CPU, for inputs of at least 20,480 values, that is channels-last: oneDNN's
    convolutions, their backward pass and max pooling run 1.5-2x faster on it than on the
    default layout for the batches of small images and narrow nets here (docs/benchmarks.md,
    "One training step"), with the same values to float rounding. Smaller inputs keep the
    default layout, on which PyTorch runs its own direct convolution, faster there (one
    50x50 view: 1.0 ms against 1.6 ms); ``LeNet`` turns any input channels-last itself, for
    its max pooling. Weights keep the default layout (a checkpoint
    stores them as they are). Elsewhere the input is left as it is.
    """
    if x.device.type == "cpu" and x.dim() == 4 and x.numel() >= 20480:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def build_model(config: ModelConfig) -> nn.Module:
    """The model a config names: :class:`ZoomIn` for ``zoomin`` and ``ats``, else the CNN."""
    return CNNBaseline(config) if config.kind == "cnn" else ZoomIn(config)
