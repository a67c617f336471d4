"""Losses of the Zoom-In network (docs/design.md, "Losses"; paper Sec. 2.3).

- cross-entropy on ``g(z)``;
- the entropy regularizer on every attention map (raises entropy, keeps sampling exploring);
- the in-sample contrastive term: a sample drawn from the complementary distributions must
  not look like the true (non-reference) class, ``-log(1 - p_y)``;
- an instance loss on the sampled sub-tiles (multiple-instance learning: every sub-tile of a
  reference-class image is of the reference class; the log-sum-exp pool of the sub-tiles of
  any other image is of its class), which trains ``f`` from the first hits instead of
  through a mean that dilutes one object among many background sub-tiles. Without a
  reference class (multi-class sets such as Megapixel MNIST, where no class is "empty") an
  image of class c holds evidence for c somewhere (the log-sum-exp pool of its sub-tiles'
  c-logits is positive) and, one class against the rest, none of its sub-tiles is evidence
  for another class: the other classes play the part of the negative of a binary task;
- supervision of attention maps by object masks, when masks exist.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def entropy_regularizer(log_maps: list[list[torch.Tensor]]) -> torch.Tensor:
    """Batch mean over images of the sum over levels of the mean entropy of that level's maps.

    Args:
        log_maps: per level, per image, ``(M, G)`` log-probability maps.

    Returns:
        A scalar to *subtract*, times lambda, from the loss.
    """
    per_image = []
    for b in range(len(log_maps[0])):
        total = log_maps[0][b].new_zeros(())
        for level in log_maps:
            lp = level[b]
            if lp.numel():
                total = total + (-(lp.exp() * lp).sum(dim=-1)).mean()
        per_image.append(total)
    return torch.stack(per_image).mean()


def contrastive_loss(logits: torch.Tensor, labels: torch.Tensor, reference: int | None) -> torch.Tensor:
    """``-log(1 - p_y)`` of the complementary sample, for images not of the reference class.

    Args:
        logits: ``(B, classes)`` from the contrastive aggregate.
        labels: ``(B,)`` class indices.
        reference: the negative / reference class (None: every image takes part, the
            multi-class form).
    """
    keep = labels != reference if reference is not None else torch.ones_like(labels, dtype=torch.bool)
    if not keep.any():
        return logits.new_zeros(())
    log_p = torch.log_softmax(logits[keep], dim=1)  # (B', classes)
    log_py = log_p.gather(1, labels[keep, None]).squeeze(1)
    # log(1 - p_y), stably: log1p(-exp(log p_y)), with p_y kept below one
    return -torch.log1p(-log_py.exp().clamp(max=1 - 1e-6)).mean()


def instance_loss(
    leaf_logits: torch.Tensor, leaf_image: torch.Tensor, labels: torch.Tensor, reference: int | None
) -> torch.Tensor:
    """Multiple-instance loss on the sampled sub-tiles.

    Args:
        leaf_logits: ``(L, classes)``, the classifier applied to each sub-tile's feature.
        leaf_image: ``(L,)`` image of each sub-tile.
        labels: ``(B,)`` image labels.
        reference: the class whose images hold no object (None: no such class; every image
            is a bag of its own class, pooled class by class).
    """
    terms = []
    for b, y in enumerate(labels.tolist()):
        rows = leaf_logits[leaf_image == b]  # (L_b, classes)
        if rows.numel() == 0:
            continue
        if reference is None:
            # one class against the rest: the log-sum-exp pool of class y's logits is
            # positive (a mean while no sub-tile stands out, a max once one does); for every
            # other class each sub-tile is a negative instance, which gives the background
            # the place the reference class holds in a binary task
            bag = torch.logsumexp(rows[:, y], dim=0) - math.log(rows.shape[0])
            others = torch.cat([rows[:, :y], rows[:, y + 1 :]], dim=1)  # (L_b, classes - 1)
            terms.append(F.softplus(-bag) + F.softplus(others).mean())
        elif y == reference:
            terms.append(F.cross_entropy(rows, torch.full((rows.shape[0],), y, device=rows.device)))
        else:
            # log-sum-exp pooling of the margins: a mean while no sub-tile stands out (every
            # sub-tile of a positive bag shares the push, so an object seen only in positive
            # bags rises from the first hit), a max once one does
            margin = rows[:, y] - rows[:, reference]  # (L_b,)
            bag = torch.logsumexp(margin, dim=0) - math.log(margin.numel())
            terms.append(F.softplus(-bag))  # -log sigmoid(bag)
    return torch.stack(terms).mean() if terms else leaf_logits.new_zeros(())


def leaf_scores(
    leaf_logits: torch.Tensor, leaf_image: torch.Tensor, labels: torch.Tensor, reference: int | None
) -> torch.Tensor:
    """How much evidence each sampled sub-tile carries, in [0, 1] (detached): the target of
    :func:`attention_distillation_loss`.

    With a reference class, ``1 - p(reference)``: the sub-tile holds an object. Without
    one, ``sigmoid(logit of its image's label)``, the one-against-the-rest probability
    that the sub-tile shows what its image is labelled (background scores low).

    Args:
        leaf_logits: ``(L, classes)``.
        leaf_image: ``(L,)`` image of each sub-tile.
        labels: ``(B,)`` image labels.
        reference: the class whose images hold no object, or None.
    """
    logits = leaf_logits.detach().float()
    if reference is not None:
        return 1.0 - torch.softmax(logits, dim=1)[:, reference]
    return torch.sigmoid(logits.gather(1, labels[leaf_image][:, None]).squeeze(1))  # (L,)


def mask_attention_loss(log_maps: list[torch.Tensor], coverage: list[torch.Tensor]) -> torch.Tensor:
    """Cross-entropy between normalised mask coverage and attention, over maps with objects.

    Args:
        log_maps: ``(G,)`` log-probability maps.
        coverage: ``(G,)`` object coverage fraction of each cell, same order.
    """
    terms = []
    for lp, cov in zip(log_maps, coverage):
        total = cov.sum()
        if total > 0:
            terms.append(-(cov / total * lp).sum())
    return torch.stack(terms).mean() if terms else torch.zeros(())


def attention_distillation_loss(
    cell_logits: list[dict], leaf_paths: list[tuple], leaf_scores: torch.Tensor
) -> torch.Tensor:
    """Teach attention where the feature net found something.

    Each sampled sub-tile's object score (``1 - p(reference)`` from the classifier applied to
    its own feature, detached) becomes the target of a logistic loss on the raw logit of every
    cell on its path; a cell reached by several sub-tiles takes the highest score. Softmax
    ignores a shift of all logits, so anchoring them this way leaves the attention
    distribution free; it gives the attention nets a direct, low-variance signal while the
    score-function gradient through sampled cells is still weak.

    Args:
        cell_logits: per level, ``{(image, parent box): (G,) raw logits}``.
        leaf_paths: per sub-tile, ``(image, parent box, cell)`` at every level.
        leaf_scores: ``(L,)`` targets in [0, 1].
    """
    targets: dict[tuple[int, tuple, int], float] = {}
    for path, score in zip(leaf_paths, leaf_scores.tolist()):
        for level, (image, box, cell) in enumerate(path):
            key = (level, (image, box), cell)
            targets[key] = max(targets.get(key, 0.0), score)
    if not targets:
        return leaf_scores.new_zeros(())
    logits, goal = [], []
    for lv, table in enumerate(cell_logits):
        chosen = [((parent, cell), score) for (level, parent, cell), score in targets.items() if level == lv]
        if not chosen:
            continue
        cells = [pc for pc, _ in chosen]
        if hasattr(table, "flat_index"):  # the model's CellTable: one gather per level
            logits.append(table.table().flatten()[table.flat_index(cells)])
        else:
            logits.append(torch.stack([table[parent][cell] for parent, cell in cells]))
        goal += [score for _, score in chosen]
    logits = torch.cat(logits)
    goal = torch.tensor(goal, dtype=logits.dtype, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits, goal)
