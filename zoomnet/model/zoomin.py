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

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from zoomnet.config.model import ModelConfig
from zoomnet.core import expectation, sampling
from zoomnet.core.geometry import Box, cell_boxes, cells_in_image, grid_shape, pool_to_grid, pooling_plan, sum_to_grid
from zoomnet.core.source import ImageSource
from zoomnet.core.tissue import tissue_of_views, tissue_threshold
from zoomnet.data.prefetch import prefetched
from zoomnet.model.cells import CellTable, LevelGrid, Nodes, restrict
from zoomnet.model.chunks import in_chunks, padded, widest_output
from zoomnet.model.host import HostValues, to_host
from zoomnet.model.outputs import LevelTrace, Sample, ZoomInOutput, in_eval_mode
from zoomnet.model.reading import read_boxes, repeat_edges, view_size
from zoomnet.nets import build
from zoomnet.nets.encoders import encoder_input
from zoomnet.nets.layout import conv_layout, standardized
from zoomnet.nets.registry import resolve


OVERLAP_READS: bool | None = None  # None: by device (ZoomIn.overlap_reads)


class _Done:
    """A value in the shape of a finished future."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def first_copies(sources: Sequence[ImageSource]) -> list[int]:
    """Per image of a batch, the first image with the same source object (itself where
    none comes before): copies of one image, as draw sets are, share what is computed of it."""
    first: dict[int, int] = {}
    return [first.setdefault(id(src), b) for b, src in enumerate(sources)]


GPU_CHUNKS = (256, 64)  # the least chunk and view_chunk off the CPU (the defaults: a few MB of activations)
VIEW_CHUNK_BYTES = 8 << 20  # on a CPU at inference: a deeper level's views per call keep its widest layer under this


def attend(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An attention net's ``(M, h, w)`` logits and their learnt part (the same tensor for a
    net without a prior, e.g. one registered by a user)."""
    if getattr(net, "prior_gain", None) is not None:
        return net(x, split=True)
    logits = net(x)
    return logits, logits


def attention_net(config: ModelConfig, name: str) -> nn.Module:
    """The attention net ``name`` of a level, with the config's width, depth, head and prior
    (a user's net need not know the prior, the depth or the head: it gets those it takes)."""
    takes = inspect.signature(resolve("attention", name)).parameters
    extra = {"prior": config.attention_prior} if config.attention_prior and "prior" in takes else {}
    extra.update({k: v for k, v in (("depth", config.attention_depth), ("head", config.attention_head)) if k in takes})
    return build("attention", name, in_channels=len(config.pixel_mean), width=config.attention_width, **extra)


@dataclass
class _Pass:
    """One sampling pass down the hierarchy: how it draws, and (the contrastive pass) which
    maps it draws from."""

    sources: Sequence[ImageSource]
    n: int
    deterministic: bool
    generator: torch.Generator | None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None  # the complementary maps
    cell_mask: torch.Tensor | None = None  # (B, G1) level-1 cells it may draw (tissue, inside)

    @property
    def size(self) -> tuple[int, int]:
        return self.sources[0].height, self.sources[0].width


@dataclass
class _Tables:
    """Per level, the maps of every parent computed in a forward pass (shared by its two
    passes): log-probabilities, and the raw logits of the attention nets' learnt part."""

    maps: list[CellTable] = field(default_factory=list)
    logits: list[CellTable] = field(default_factory=list)
    allowed: list[CellTable] = field(default_factory=list)  # with the tissue mask: the cells each map may draw
    thresholds: list[float | None] = field(default_factory=list)  # per image: its tissue's saturation threshold

    @classmethod
    def new(cls, levels: int) -> "_Tables":
        return cls(*([CellTable() for _ in range(levels)] for _ in range(3)))


class ZoomIn(nn.Module):
    """K-level attention sampling (K = 1: ATS; K = 2: Zoom-In).

    >>> import numpy as np
    >>> from zoomnet.config import LevelConfig
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
        self.config = config
        c = len(config.pixel_mean)
        self.attention = nn.ModuleList(attention_net(config, lv.attention) for lv in config.levels)
        self.feature = build("feature", config.feature, in_channels=c, **config.feature_kwargs)
        self.classifier = build(
            "classifier", "linear", in_dim=self.feature.out_dim,
            num_classes=config.num_classes, scale=config.classifier_scale,
        )
        self.register_buffer("mean", torch.tensor(config.pixel_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.pixel_std).view(1, -1, 1, 1), persistent=False)
        size, f_mean, f_std = encoder_input(config, self.feature)
        self.feature_size = size
        self.register_buffer("feature_mean", torch.tensor(f_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("feature_std", torch.tensor(f_std).view(1, -1, 1, 1), persistent=False)
        if config.feature_frozen:
            self.feature.requires_grad_(False)
        self._grids: dict[tuple[int, int, int], LevelGrid] = {}
        self._centre_spans: dict[tuple[int, int, int], tuple[float, ...]] = {}

    # ------------------------------------------------------------------ geometry
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

    # ------------------------------------------------------------------ pixels in
    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Raw pixels ``(M, C, h, w)`` -> network input (in the model's dtype and
        :func:`conv_layout`)."""
        return conv_layout(standardized(pixels, self.mean, self.std))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Raw sub-tile pixels ``(L, C, h, w)`` -> features ``(L, D)``: normalised with the
        feature net's statistics, resampled to its input size (where it declares one), and
        without gradients through a frozen net."""
        x = standardized(pixels, self.feature_mean, self.feature_std)
        if self.feature_size is not None and tuple(x.shape[-2:]) != self.feature_size:
            x = F.interpolate(x, size=self.feature_size, mode="bilinear", align_corners=False, antialias=True)
        with torch.no_grad() if self.config.feature_frozen else contextlib.nullcontext():
            return self.feature(conv_layout(x))

    def train(self, mode: bool = True) -> "ZoomIn":
        """As ``nn.Module.train``; a frozen feature net stays in eval mode (its batch
        statistics are those it was trained with)."""
        super().train(mode)
        if self.config.feature_frozen:
            self.feature.eval()
        return self

    def inference_chunks(self) -> tuple[int, int]:
        """Sub-tiles per call of ``f`` and parent views per call of a deeper level's attention
        net at inference: the configuration's on a CPU (where small chunks stay in cache:
        the colon preset's 1 and 1); elsewhere at least ``GPU_CHUNKS`` (256, 64), below which
        a GPU waits on one launch per sub-tile."""
        chunk, view_chunk = self.config.chunk, self.config.view_chunk
        if self.mean.device.type == "cpu":
            return chunk, view_chunk
        return max(chunk, GPU_CHUNKS[0]), max(view_chunk, GPU_CHUNKS[1])

    def _views_per_call(self, level: int, view_hw: tuple[int, int]) -> int:
        """Parent views per call of ``level``'s attention net at inference: ``view_chunk`` (at
        least ``GPU_CHUNKS[1]`` off the CPU); on a CPU no more than keep the net's widest layer
        output under ``VIEW_CHUNK_BYTES``, so that a slide's large views (a 1/32 view of an
        8192 px tile is 256^2) take a few MB per call, as a small image's do."""
        step = self.inference_chunks()[1]
        if self.mean.device.type != "cpu":
            return step
        net = self.attention[level]
        probe = self.mean.new_zeros(()).expand(1, self.mean.shape[1], *view_hw)  # a shape, no memory
        per_view = widest_output(net, lambda v: attend(net, self.normalize(v)), probe)
        return max(1, min(step, VIEW_CHUNK_BYTES // per_view))

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

    # ------------------------------------------------------------------ attention maps
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
        logits, learned = in_chunks(net, lambda v: attend(net, self.normalize(v)), views)  # (M, h, w) each
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

    def _level1(
        self, sources: Sequence[ImageSource], views: torch.Tensor | None, tables: _Tables
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Level 1: ``(B, G1)`` log-probabilities (restricted to the cells that may be drawn),
        raw logits, and the ``(B, G1)`` mask of those cells (None: every cell). With the
        tissue mask, each image's tissue threshold goes to ``tables`` for the deeper levels."""
        height, width = sources[0].height, sources[0].width
        tissue = None
        if views is None and self.views_in_strips(height, width):
            log_alpha, raw_alpha, tissue, tables.thresholds = self._level1_in_strips(sources)  # (B, G1) each
        else:
            if views is None:
                views = self.read_views(sources)
            first = first_copies(sources)  # copies of one source (draw sets of one image): its maps once
            unique = sorted(set(first))
            shared = views if len(unique) == len(sources) else views[unique]  # no copy of distinct views
            log_alpha, raw_alpha = self._attention_maps(0, shared, (height, width))  # (B', G1) each
            if len(unique) < len(sources):
                rows = torch.tensor([unique.index(b) for b in first], device=log_alpha.device)
                log_alpha, raw_alpha = log_alpha[rows], raw_alpha[rows]
            if self.config.tissue_mask:
                tables.thresholds = [tissue_threshold(v) for v in views.cpu()]
                tissue = tissue_of_views(views.cpu(), tables.thresholds)
        cell_mask = self._tissue_cells(tissue, height, width) if tissue is not None else None
        inside = self._cells_in_image(0, (height, width), [Box(0, 0, height, width)], height, width)
        if inside is not None:  # tiles that stick out of the image far enough to miss it
            inside = inside.to(log_alpha.device).expand(len(sources), -1)
            cell_mask = inside if cell_mask is None else cell_mask & inside
        if cell_mask is not None:
            log_alpha = restrict(log_alpha, cell_mask)
        return log_alpha, raw_alpha, cell_mask

    def _level1_in_strips(
        self, sources: Sequence[ImageSource]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[float | None]]:
        """Level-1 attention of large views, read and run in horizontal strips
        (:meth:`_strip_logits`); also the tissue maps of the views and their thresholds when
        ``tissue_mask`` is on."""
        height, width = sources[0].height, sources[0].width
        # the learnt part differs from the logits (and is needed for distillation, in training)
        split = getattr(self.attention[0], "prior_gain", None) is not None and torch.is_grad_enabled()
        g = self._level_grid(0, (height, width))
        maps, raws, tissue, thresholds = [], [], [], []
        for src in sources:
            full, learned, view = self._strip_logits(src)  # (1, vh, vw) each; the raw view with the mask
            cell = pool_to_grid(full, g.rows, g.cols)
            log_p, raw = self._cell_maps(cell, pool_to_grid(learned, g.rows, g.cols) if split else cell)
            maps.append(log_p)
            raws.append(raw)
            if view is not None:
                thresholds.append(tissue_threshold(view))
                tissue.append(tissue_of_views(view[None], thresholds[-1:])[0])
        return torch.cat(maps), torch.cat(raws), (torch.stack(tissue) if tissue else None), thresholds

    def _strip_logits(self, src: ImageSource) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One image's level-1 logits ``(1, vh, vw)``, their learnt part, and (with the tissue
        mask) its raw view ``(C, vh, vw)``, joined from the strips' own rows.

        Each strip of ``strip_rows`` view rows is read with a halo of the attention net's
        receptive-field radius above and below, so its own rows get exactly the logits of
        a whole-view pass; only one strip's pixels and activations are alive at a time (in
        training the strip's activations are recomputed in the backward pass).
        """
        height, width = src.height, src.width
        vh, vw = view_size(self.config.levels[0].scale, height, width)
        net = self.attention[0]
        halo, step = getattr(net, "halo", 3), self.config.strip_rows
        rows_per_px = height / vh  # full-resolution rows per view row
        logits, learned, tissue_rows = [], [], []
        for r0 in range(0, vh, step):
            r1 = min(vh, r0 + step)
            a0, a1 = max(0, r0 - halo), min(vh, r1 + halo)
            top, bottom = round(a0 * rows_per_px), round(a1 * rows_per_px)
            strip = src.read(Box(top, 0, bottom - top, width), (a1 - a0, vw))[None]  # (1, C, a1-a0, vw)
            x = self.normalize(strip)
            if torch.is_grad_enabled():
                out, own = torch.utils.checkpoint.checkpoint(attend, net, x, use_reentrant=False)
            else:
                out, own = attend(net, x)
            logits.append(out[:, r0 - a0 : r1 - a0])  # (1, r1-r0, vw)
            learned.append(own[:, r0 - a0 : r1 - a0])
            if self.config.tissue_mask:
                tissue_rows.append(strip[0, :, r0 - a0 : r1 - a0])  # (C, r1-r0, vw) raw
        view = torch.cat(tissue_rows, dim=1) if tissue_rows else None
        return torch.cat(logits, dim=1), torch.cat(learned, dim=1), view

    def _tissue_cells_of(self, level: int, parent_hw: tuple[int, int], views: torch.Tensor,
                         thresholds: list[float | None]) -> torch.Tensor:
        """``(M, G)`` bool: the cells of these parents' raw views ``(M, C, h, w)`` that hold
        tissue by their images' thresholds (every cell of a parent that holds none)."""
        g = self._level_grid(level, parent_hw)
        t = tissue_of_views(views.cpu(), thresholds).float()  # (M, h, w)
        cells = (t.flatten(1) if g.rows is None else sum_to_grid(t, g.rows, g.cols).flatten(1)) > 0  # (M, G)
        cells[~cells.any(dim=1)] = True  # never hide a whole parent
        return cells.to(self.mean.device)

    def _tissue_cells(self, tissue: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``(B, v_h, v_w)`` bool tissue maps -> ``(B, G1)`` bool: cells holding any tissue."""
        g = self._level_grid(0, (height, width))
        rows, cols = g.rows, g.cols
        t = tissue.float()
        cells = (t.flatten(1) if rows is None else sum_to_grid(t, rows, cols).flatten(1)) > 0  # (B, G1)
        cells[~cells.any(dim=1)] = True  # never hide a whole image
        return cells.to(self.mean.device)

    # ------------------------------------------------------------------ the hierarchy
    def _descend(self, log_alpha: torch.Tensor, p: _Pass, tables: _Tables, record: list[LevelTrace] | None) -> Nodes:
        """Sample down the hierarchy, one level at a time; return the leaves with their path
        weights.

        Every level is one batch of tensor operations over all its parents (draws, weights
        and path products), whatever the number of images and parents; Python only keeps the
        boxes."""
        B = log_alpha.shape[0]
        nodes = self._draw_level1(log_alpha, p)
        if record is not None:
            record[0].samples = self._samples_of(nodes, B)
        for level in range(1, len(self.config.levels)):
            log_beta, allowed = self._parent_maps(level, nodes, p, tables)
            nodes = self._draw_children(level, nodes, log_beta, allowed, p)
            if record is not None:
                record[level].samples = self._samples_of(nodes, B)
        return nodes

    def _draw_level1(self, log_alpha: torch.Tensor, p: _Pass) -> Nodes:
        """N draws with replacement from each image's level-1 map: the drawn tiles, with
        their multiplicities and estimator weights."""
        height, width = p.size
        la = p.transform(log_alpha) if p.transform else log_alpha  # (B, G1)
        if p.transform and p.cell_mask is not None:  # the complement of a masked map stays masked
            la = restrict(la, p.cell_mask)
        if p.deterministic:
            counts = sampling.largest_remainder_counts(la, p.n)
        else:
            counts = sampling.sample_with_replacement(la, p.n, p.generator)  # (B, G1)
        weights = expectation.with_replacement_weights(la, counts.to(la.device))  # (B, G1)
        rel = self._level_grid(0, (height, width)).rel.numpy()
        whole = Box(0, 0, height, width)
        counts = to_host(counts)  # the level's one read: the reader needs the drawn tiles
        image_at, cell_at = np.nonzero(counts)  # (M,) each: (image, cell), image by image
        images, cells = image_at.tolist(), cell_at.tolist()
        at = torch.from_numpy(np.stack([image_at, cell_at])).to(la.device)
        return Nodes(
            images, [Box(*r) for r in rel[cell_at].tolist()], weights[at[0], at[1]],
            counts[image_at, cell_at].tolist(), cells, [((b, whole, c),) for b, c in zip(images, cells)],
        )

    def _parent_maps(
        self, level: int, nodes: Nodes, p: _Pass, tables: _Tables
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The ``(M, G)`` maps a level draws from, one row per parent in ``nodes`` (the
        complementary maps in the contrastive pass), and the ``(M, G)`` cells each may draw
        (None: every cell)."""
        height, width = p.size
        parent_hw = tuple(self.config.levels[level - 1].region)
        keys = list(zip(nodes.image, nodes.box))
        self._add_maps(level, keys, p, tables)
        log_beta = tables.maps[level].rows(keys)  # (M, G)
        if self.config.tissue_mask:  # inside the image and on tissue, as computed with the maps
            allowed = tables.allowed[level].rows(keys)
            allowed = None if bool(allowed.all()) else allowed
        else:
            allowed = self._cells_in_image(level, parent_hw, nodes.box, height, width)
        if p.transform:
            log_beta = p.transform(log_beta)
            if allowed is not None:  # the complement of a restricted map stays restricted
                log_beta = restrict(log_beta, allowed.to(log_beta.device))
        return log_beta, allowed

    def _add_maps(self, level: int, keys: list[tuple[int, Box]], p: _Pass, tables: _Tables) -> None:
        """Compute the maps of the parents among ``keys`` that have none yet: their views read
        and run through the level's attention net, normalised and restricted to the image."""
        missing = list(dict.fromkeys(k for k in keys if k not in tables.maps[level]))
        if not missing:
            return
        first = first_copies(p.sources)  # copies of one source (draw sets of one image) share their parents' maps
        todo = list(dict.fromkeys((first[b], box) for b, box in missing))
        maps, raw, allowed = self._new_maps(level, todo, p, tables)
        if len(todo) < len(missing):
            at = {key: i for i, key in enumerate(todo)}
            rows = torch.tensor([at[(first[b], box)] for b, box in missing])
            maps, raw = maps[rows.to(maps.device)], raw[rows.to(raw.device)]
            allowed = None if allowed is None else allowed[rows.to(allowed.device)]
        if self.config.tissue_mask and allowed is not None:
            tables.allowed[level].add(missing, allowed)
        tables.maps[level].add(missing, maps)
        tables.logits[level].add(missing, raw)

    def _new_maps(self, level: int, missing: list[tuple[int, Box]], p: _Pass, tables: _Tables
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The maps of ``missing`` parents (restricted), their raw logits and drawable cells."""
        height, width = p.size
        parent_hw = tuple(self.config.levels[level - 1].region)
        vs = self._level_grid(level, parent_hw).view
        # inference: the memory of one chunk; training keeps every chunk's activations for
        # the backward pass anyway, so its views go through the net in one call
        step = self._views_per_call(level, vs) if not torch.is_grad_enabled() else len(missing)
        pieces, tissue = [], []  # cell logits, chunk by chunk: small beside the net's activations
        for start in range(0, len(missing), step):
            part = missing[start : start + step]
            views = repeat_edges(read_boxes(p.sources, part, vs), [box for _, box in part], height, width)
            pieces.append(self._cell_logits(level, views, parent_hw))  # (M, G) each
            if self.config.tissue_mask:
                tissue.append(self._tissue_cells_of(level, parent_hw, views, [tables.thresholds[b] for b, _ in part]))
        maps, raw = self._cell_maps(*(torch.cat(q) if len(pieces) > 1 else q[0] for q in zip(*pieces)))
        allowed = self._cells_in_image(level, parent_hw, [box for _, box in missing], height, width)
        if tissue:  # and on tissue: a parent's glass is never drawn
            on_tissue = torch.cat(tissue)
            allowed = on_tissue if allowed is None else allowed & on_tissue
        if allowed is not None:  # cells that would show the fill outside the image, or glass
            maps = restrict(maps, allowed.to(maps.device))
        return maps, raw, allowed

    def _draw_children(
        self, level: int, nodes: Nodes, log_beta: torch.Tensor, allowed: torch.Tensor | None, p: _Pass
    ) -> Nodes:
        """Each parent's children, as many as its multiplicity (at most its drawable cells),
        drawn without replacement, with their path weights (parent's weight times their own)."""
        G = log_beta.shape[1]
        # draws per parent: its multiplicity, at most its drawable cells (Python numbers
        # where every cell is drawable: no tensor work for a few small integers)
        cells = [G] * len(nodes.image) if allowed is None else to_host(allowed.sum(dim=1)).tolist()
        k_list = [min(c, n) for c, n in zip(nodes.count, cells)]
        order, w = self._child_weights(log_beta, allowed, k_list, cells, p)  # (M, k_max) each
        # the first k of each parent's draws, row by row, in draw order
        parents = [i for i, n_i in enumerate(k_list) for _ in range(n_i)]
        rows, cols = np.array(parents, dtype=np.int64), np.array([j for n_i in k_list for j in range(n_i)], dtype=np.int64)
        at = torch.from_numpy(np.stack([rows, cols])).to(w.device)
        child_w = (nodes.weight[:, None] * w)[at[0], at[1]]
        draws = to_host(order)[rows, cols]  # the level's one read: the reader needs the drawn sub-tiles
        rel = self._level_grid(level, tuple(self.config.levels[level - 1].region)).rel.numpy()
        rel_draws = rel[draws].tolist()
        draws = draws.tolist()
        return Nodes(
            [nodes.image[i] for i in parents],
            [Box(nodes.box[i].top + t, nodes.box[i].left + l, h, ww) for i, (t, l, h, ww) in zip(parents, rel_draws)],
            child_w, [1] * len(parents), draws,
            [nodes.path[i] + ((nodes.image[i], nodes.box[i], c),) for i, c in zip(parents, draws)],
        )

    @staticmethod
    def _child_weights(
        log_beta: torch.Tensor, allowed: torch.Tensor | None, k_list: list[int], cells: list[int], p: _Pass
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, k_max)`` cells drawn from each parent's map in draw order, and their
        estimator weights; a parent drawn as often as it has cells takes every one with its
        exact weight."""
        G = log_beta.shape[1]
        k, k_max = torch.tensor(k_list), max(k_list)  # (M,)
        if p.deterministic:
            order = sampling.top_k_children(log_beta, k_max)  # (M, k_max)
        else:
            order = sampling.sample_without_replacement(log_beta, k_max, p.generator)
        order = order.to(log_beta.device)
        w = expectation.without_replacement_weights(log_beta, order, k)  # (M, k_max)
        takes_all = [k_i == n for k_i, n in zip(k_list, cells)]
        if any(takes_all):  # the exact sum for those parents
            every = torch.arange(G).expand(len(k_list), G)
            if allowed is not None:  # drawable cells first, in index order
                every = torch.sort((~allowed).to(torch.uint8), dim=1, stable=True).indices
            every = every[:, :k_max].to(log_beta.device)
            exact = torch.tensor(takes_all).to(log_beta.device)[:, None]
            order = torch.where(exact, every, order)
            w = torch.where(exact, expectation.exact_weights(log_beta).gather(1, every), w)
        return order, w

    @staticmethod
    def _samples_of(nodes: Nodes, batch: int) -> list[list[Sample]]:
        out: list[list[Sample]] = [[] for _ in range(batch)]
        weights = HostValues(nodes.weight)  # read only where a picture or a GeoJSON asks
        for i, (b, box, count, cell) in enumerate(zip(nodes.image, nodes.box, nodes.count, nodes.cell)):
            out[b].append(Sample(box, count, (weights, i), cell))
        return out

    # ------------------------------------------------------------------ the estimator
    def _aggregate(
        self, leaves: Nodes, sources: Sequence[ImageSource], batch: int, keep: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, list[Box], list[tuple]]:
        """``z = sum_leaves W f(leaf)``; each distinct sub-tile read and embedded once.

        Returns ``z`` ``(B, D)``, the leaves' features ``(L, D)`` (with ``keep``: training,
        one pass, kept for the graph and the instance loss; else None, ``f`` run in chunks
        of ``chunk`` sub-tiles), each distinct leaf's image ``(L,)``, box and path."""
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
        z = torch.zeros(batch, self.feature.out_dim, device=self.mean.device, dtype=weights.dtype)
        boxes = [box for _, box in keys]
        if keep:
            pixels = read_boxes(sources, keys)  # (L, C, h, w)
            # float32 under autocast too: the classifier and the instance loss take them outside it
            feats = in_chunks(self.feature, self.encode, pixels).to(weights.dtype)
            return z.index_add(0, image, weights[:, None] * feats), feats, image, boxes, leaf_paths
        chunk = self.inference_chunks()[0]
        starts = range(0, len(keys), chunk)
        if self.overlap_reads():  # the next chunk is read (and copied) while f runs on this one
            reads = prefetched(lambda s: read_boxes(sources, keys[s : s + chunk]), starts, name="zoomnet-subtiles")
        else:
            reads = ((s, _Done(read_boxes(sources, keys[s : s + chunk]))) for s in starts)
        for start, pixels in reads:  # inference: memory of one chunk
            feats = padded(self.feature, self.encode, pixels.result())  # (chunk, D)
            sl = slice(start, min(start + chunk, len(keys)))
            z = z.index_add(0, image[sl], weights[sl, None] * feats.to(weights.dtype))
        return z, None, image, boxes, leaf_paths

    def overlap_reads(self) -> bool:
        """Whether inference reads the next chunk of sub-tiles in a thread while ``f`` runs on
        this one: off the CPU (the host reads while the device computes; on a CPU they share
        the cores) or where ``OVERLAP_READS`` says so."""
        return OVERLAP_READS if OVERLAP_READS is not None else self.mean.device.type != "cpu"

    # ------------------------------------------------------------------ a pass
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
        B, (height, width) = len(sources), (sources[0].height, sources[0].width)
        trained_n = cfg.train_samples if isinstance(cfg.train_samples, int) else None  # "auto": not chosen yet
        n = samples or (trained_n if self.training and trained_n else cfg.samples)
        tables = _Tables.new(len(cfg.levels))
        log_alpha, raw_alpha, cell_mask = self._level1(sources, views, tables)
        whole = Box(0, 0, height, width)
        tables.logits[0].add([(b, whole) for b in range(B)], raw_alpha)
        traces = [LevelTrace([{whole: log_alpha[b].detach().exp()} for b in range(B)],
                             self._level_grid(0, (height, width)).grid, [])]
        traces += [LevelTrace([{} for _ in range(B)], self._level_grid(level, tuple(cfg.levels[level - 1].region)).grid, [])
                   for level in range(1, len(cfg.levels))]
        leaves = self._descend(log_alpha, _Pass(sources, n, deterministic, generator), tables, traces)
        keep = torch.is_grad_enabled()
        z, feats, image, boxes, leaf_paths = self._aggregate(leaves, sources, B, keep)
        log_maps, parents = self._maps_by_image(log_alpha, tables, traces, B)  # before the contrastive pass adds any
        out = ZoomInOutput(
            logits=self.classifier(z), z=z, levels=traces, log_maps=log_maps, parents=parents, leaf_features=feats,
            leaf_image=image, leaf_boxes=boxes, leaf_paths=leaf_paths, cell_logits=tables.logits,
        )
        if contrastive:
            complement = _Pass(sources, n, deterministic, generator, sampling.complement_log_probs, cell_mask)
            c_leaves = self._descend(log_alpha, complement, tables, None)
            out.contrastive_logits = self.classifier(self._aggregate(c_leaves, sources, B, keep)[0])
        return out

    def _maps_by_image(
        self, log_alpha: torch.Tensor, tables: _Tables, traces: list[LevelTrace], batch: int
    ) -> tuple[list[list[torch.Tensor]], list[list[list[Box]]]]:
        """Per level, per image: the ``(M, G)`` log-maps of its parents (with gradient) and
        their boxes; the traces get the maps as probabilities."""
        whole = next(iter(traces[0].maps[0]))
        log_maps: list[list[torch.Tensor]] = [[log_alpha[b : b + 1] for b in range(batch)]]
        parents: list[list[list[Box]]] = [[[whole] for _ in range(batch)]]
        for level in range(1, len(self.config.levels)):
            per_image_maps, per_image_parents = [], []
            for b in range(batch):
                keys = [key for key in tables.maps[level] if key[0] == b]
                per_image_parents.append([box for _, box in keys])
                rows = tables.maps[level].rows(keys) if keys else log_alpha.new_zeros(0, 1)
                per_image_maps.append(rows)
                # one operation per image, not one per parent
                traces[level].maps[b] = dict(zip([box for _, box in keys], rows.detach().exp().unbind(0)))
            log_maps.append(per_image_maps)
            parents.append(per_image_parents)
        return log_maps, parents

    @torch.inference_mode()
    def predict(self, sources: Sequence[ImageSource], **kwargs) -> ZoomInOutput:
        """Inference without gradients: ``f`` runs over the sub-tiles in chunks.

        It runs in inference mode (no autograd bookkeeping at all), so the output's tensors
        are inference tensors: read them, compute from them, or ``clone()`` them before
        changing them in place outside inference mode."""
        return in_eval_mode(self, sources, **kwargs)
