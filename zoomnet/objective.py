"""The training objective: which loss terms a batch gets, and how they are weighted
(docs/design.md, "Losses"); the terms themselves are pure functions in
:mod:`zoomnet.core.losses`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoomnet.config.train import TrainConfig
from zoomnet.core import losses
from zoomnet.core.geometry import Box
from zoomnet.data.examples import Example
from zoomnet.model import ZoomIn, ZoomInOutput


def mask_coverage(model: ZoomIn, out: ZoomInOutput, examples: list[Example]) -> tuple[list, list]:
    """Per attention map of images with objects: ``(log map, object coverage per cell)``."""
    maps, covers = [], []
    for level, lv in enumerate(model.config.levels):
        t_h, t_w = lv.cell_stride()
        for b, ex in enumerate(examples):
            if ex.mask is None:
                continue
            for box, lp in zip(out.parents[level][b], out.log_maps[level][b]):
                g_h, g_w = (out.levels[level].grid if level else model._level_grid(0, (box.height, box.width)).grid)
                span = Box(box.top, box.left, round(g_h * t_h), round(g_w * t_w))
                cov = ex.mask.read(span, (g_h, g_w))[0].flatten()  # (G,) fraction covered
                maps.append(lp.flatten())
                covers.append(cov.to(lp))
    return maps, covers


def training_loss(
    model: torch.nn.Module, out: ZoomInOutput, batch: list[Example], labels: torch.Tensor,
    cfg: TrainConfig, contrastive: bool, class_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The total loss of one batch and its terms, as detached 0-d tensors (``model``
    unwrapped from DDP): nothing here waits for the device."""
    terms: dict[str, torch.Tensor] = {"ce": F.cross_entropy(out.logits.float(), labels, weight=class_weight)}
    if isinstance(model, ZoomIn):
        if cfg.entropy_weight:
            terms["entropy"] = -cfg.entropy_weight * losses.entropy_regularizer(out.log_maps)
        if contrastive and out.contrastive_logits is not None:
            terms["contrastive"] = cfg.contrastive_weight * losses.contrastive_loss(
                out.contrastive_logits, labels, cfg.reference_class
            )
        if (cfg.instance_weight or cfg.distill_weight) and out.leaf_features is not None:
            leaf_logits = model.classifier(out.leaf_features)  # (L, classes)
            if cfg.instance_weight:
                terms["instance"] = cfg.instance_weight * losses.instance_loss(
                    leaf_logits, out.leaf_image, labels, cfg.reference_class, cfg.reference_share,
                    cfg.one_class_per_image,
                )
            if cfg.distill_weight:
                scores = losses.leaf_scores(leaf_logits, out.leaf_image, labels, cfg.reference_class)
                terms["distill"] = cfg.distill_weight * losses.attention_distillation_loss(
                    out.cell_logits, out.leaf_paths, scores
                )
        if cfg.mask_weight:
            maps, covers = mask_coverage(model, out, batch)
            terms["mask"] = cfg.mask_weight * losses.mask_attention_loss(maps, covers)
    total = sum(terms.values())
    return total, {k: v.detach() for k, v in terms.items()}  # tensors: read when the epoch logs them
