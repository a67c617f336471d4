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

import torch
import torch.nn.functional as F

from zoomnet.core.sampling import drawable


def entropy_regularizer(log_maps: list[list[torch.Tensor]]) -> torch.Tensor:
    """Batch mean over images of the sum over levels of the mean entropy of that level's maps.

    Args:
        log_maps: per level, per image, ``(M, G)`` log-probability maps.

    Returns:
        A scalar to *subtract*, times lambda, from the loss.
    """
    B = len(log_maps[0])
    total = log_maps[0][0].new_zeros(B)
    for level in log_maps:  # each level's maps at once: operations do not grow with the batch
        maps = [lp for lp in level if lp.numel()]
        if not maps:
            continue
        if len({lp.shape[1] for lp in maps}) > 1:  # grids of different sizes: image by image
            for b, lp in enumerate(level):
                if lp.numel():
                    total = total + (torch.arange(B, device=total.device) == b).to(total) * (-(lp.exp() * lp).sum(-1)).mean()
            continue
        lp = torch.cat(maps)  # (R, G)
        entropy = -(lp.exp() * lp).sum(dim=-1)  # (R,)
        counts = [lp.shape[0] if lp.numel() else 0 for lp in level]
        image = torch.tensor([b for b, c in enumerate(counts) for _ in range(c)], device=lp.device)
        n = torch.tensor(counts, dtype=lp.dtype, device=lp.device).clamp_min(1)
        total = total + torch.zeros_like(total).index_add(0, image, entropy) / n
    return total.mean()


def contrastive_loss(logits: torch.Tensor, labels: torch.Tensor, reference: int | None) -> torch.Tensor:
    """``-log(1 - p_y)`` of the complementary sample, for images not of the reference class.

    Args:
        logits: ``(B, classes)`` from the contrastive aggregate.
        labels: ``(B,)`` class indices.
        reference: the negative / reference class (None: every image takes part, the
            multi-class form).
    """
    keep = labels != reference if reference is not None else torch.ones_like(labels, dtype=torch.bool)
    log_p = torch.log_softmax(logits, dim=1)  # (B, classes)
    log_py = log_p.gather(1, labels[:, None]).squeeze(1)  # (B,)
    # log(1 - p_y), stably: log1p(-exp(log p_y)), with p_y kept below one; the mean over the
    # kept images as a weighted sum (no data-dependent shape: nothing waits for the device)
    per_image = -torch.log1p(-log_py.exp().clamp(max=1 - 1e-6))
    kept = keep.to(per_image.dtype)
    return (per_image * kept).sum() / kept.sum().clamp_min(1)


def instance_loss(
    leaf_logits: torch.Tensor, leaf_image: torch.Tensor, labels: torch.Tensor, reference: int | None,
    reference_share: float | None = None, one_class_per_image: bool = False,
) -> torch.Tensor:
    """Multiple-instance loss on the sampled sub-tiles: each image is a bag of its sub-tiles;
    the mean over bags (computed for all bags at once: a fixed number of operations
    whatever the batch). With a reference class, :func:`_reference_bags`; without one
    (every image holds evidence of its class), :func:`_one_vs_rest_bags`.

    Args:
        leaf_logits: ``(L, classes)``, the classifier applied to each sub-tile's feature.
        leaf_image: ``(L,)`` image of each sub-tile.
        labels: ``(B,)`` image labels.
        reference: the class whose images hold no object (None: no such class; every image
            is a bag of its own class, pooled class by class).
        reference_share: the share of the training images that are of the reference class.
            Given, reference bags are weighted ``0.5 / share`` and the others ``0.5 / (1 -
            share)``, so that each side carries half the loss whatever the class balance
            (1 for a balanced binary set). Without it, a set whose object classes
            outnumber the reference class (three sign classes against "no sign") pushes
            every sub-tile of the many positive bags that missed the object toward "object"
            harder than the few reference bags push back: background scores rise, and the
            distillation sends the attention to it.
        one_class_per_image: without a reference class, every object of an image is of its
            class (fMoW: copies of one structure): each bag also learns which class its
            most class-like sub-tile is (see :func:`_one_vs_rest_bags`).
    """
    if leaf_logits.shape[0] == 0:
        return leaf_logits.new_zeros(())
    B = labels.shape[0]
    image = leaf_image.to(leaf_logits.device)
    y = labels.to(leaf_logits.device)[image]  # (L,) the label of each sub-tile's image
    n = torch.zeros(B, device=leaf_logits.device, dtype=leaf_logits.dtype).index_add(
        0, image, torch.ones_like(image, dtype=leaf_logits.dtype))  # (B,) sub-tiles per bag
    if reference is None:
        per_bag = _one_vs_rest_bags(leaf_logits, image, y, n, one_class_per_image)
    else:
        per_bag = _reference_bags(leaf_logits, image, y, n, labels.to(n.device) == reference, reference,
                                  reference_share)
    filled = (n > 0).to(per_bag.dtype)  # bags with a sub-tile (a weighted mean: no data-dependent shape)
    return (torch.where(n > 0, per_bag, torch.zeros_like(per_bag)) * filled).sum() / filled.sum().clamp_min(1)


def _one_vs_rest_bags(leaf_logits: torch.Tensor, image: torch.Tensor, y: torch.Tensor, n: torch.Tensor,
                      one_class_per_image: bool) -> torch.Tensor:
    """``(B,)`` per-bag losses without a reference class, one class against the rest: the
    log-sum-exp pool of class ``y``'s logits is positive (a mean while no sub-tile stands
    out, a max once one does); for every other class each sub-tile is a negative instance,
    which gives the background the place the reference class holds in a binary task.

    With ``one_class_per_image``, every bag also takes, among all classes, the cross-entropy
    of its sub-tile most like any class (highest ``sigmoid(max logit)``): it tells the
    objects apart where ``f`` has found them but calls them all one class. Where images
    also hold other classes' objects (Megapixel MNIST's minority digits) that sub-tile is
    often one of those, and the part would teach it the wrong class: leave it off there.
    """
    B, C = n.shape[0], leaf_logits.shape[1]
    own = leaf_logits.gather(1, y[:, None]).squeeze(1)  # (L,)
    bag = _bag_logsumexp(own, image, B) - torch.log(n.clamp_min(1))
    others = F.softplus(leaf_logits).masked_fill(_is_class(y, C), 0.0).sum(1) / max(C - 1, 1)  # (L,)
    per_bag = F.softplus(-bag) + _bag_mean(others, image, n)
    if one_class_per_image:
        score = torch.sigmoid(leaf_logits.detach().amax(dim=1))  # (L,) one against the rest: shows some class
        per_bag = per_bag + _standout_cross_entropy(score, torch.logsumexp(leaf_logits, dim=1) - own, image, n)
    return per_bag


def _reference_bags(leaf_logits: torch.Tensor, image: torch.Tensor, y: torch.Tensor, n: torch.Tensor,
                    is_reference: torch.Tensor, reference: int, reference_share: float | None) -> torch.Tensor:
    """``(B,)`` per-bag losses with a reference class: a reference image's sub-tiles are all
    of the reference class (cross-entropy), and another image's bag is the log-sum-exp pool
    of its sub-tiles' margins ``log p(y) / (1 - p(y))`` (every sub-tile of a positive bag
    shares the push, so an object seen only in positive bags rises from the first hit). The
    margin is taken against every other class, not the reference class alone: with several
    object classes (50, 70, 80 km/h signs and "no sign") that is what teaches the sub-tiles
    to tell the object classes apart.

    With several object classes an object bag adds which object class its object is: the
    cross-entropy among the object classes of the bag's most object-like sub-tile (highest
    ``1 - p(reference)``, detached), weighted by how far that score stands above the bag's
    mean (silent while every sub-tile looks alike; zero with one object class).
    """
    B, C = n.shape[0], leaf_logits.shape[1]
    own = leaf_logits.gather(1, y[:, None]).squeeze(1)  # (L,)
    margin = own - torch.logsumexp(leaf_logits.masked_fill(_is_class(y, C), -torch.inf), dim=1)  # (L,)
    bag = _bag_logsumexp(margin, image, B) - torch.log(n.clamp_min(1))
    reference_column = torch.arange(C, device=leaf_logits.device) == reference  # (C,)
    objects_lse = torch.logsumexp(leaf_logits.masked_fill(reference_column, -torch.inf), dim=1)  # (L,)
    object_margin = objects_lse - leaf_logits[:, reference]  # (L,) log-odds of "an object"
    ce = F.softplus(object_margin)  # (L,) cross-entropy towards the reference class
    score = torch.sigmoid(object_margin.detach())  # (L,) p(not reference)
    which = _standout_cross_entropy(score, objects_lse - own, image, n)  # (B,) 0 with one object class
    per_bag = torch.where(is_reference, _bag_mean(ce, image, n), F.softplus(-bag) + which)
    if reference_share is not None and 0.0 < reference_share < 1.0:
        weight = torch.where(is_reference, 0.5 / reference_share, 0.5 / (1.0 - reference_share))
        per_bag = per_bag * weight.to(per_bag.dtype)
    return per_bag


def _standout_cross_entropy(
    score: torch.Tensor, cross_entropy: torch.Tensor, image: torch.Tensor, n: torch.Tensor
) -> torch.Tensor:
    """``(B,)``: each bag's cross-entropy ``(L,)`` at its most object-like sub-tile (highest
    detached ``score`` ``(L,)`` in [0, 1]; ties share), weighted by how far that score stands
    above the bag's mean score (0 while every sub-tile looks alike)."""
    best = torch.zeros_like(n).scatter_reduce(0, image, score, reduce="amax", include_self=False)  # (B,)
    chosen = (score == best[image]).to(n.dtype)  # (L,) the bag's most object-like sub-tile(s)
    chosen = chosen / torch.zeros_like(n).index_add(0, image, chosen)[image]
    return torch.zeros_like(n).index_add(0, image, chosen * cross_entropy) * (best - _bag_mean(score, image, n))


def _bag_logsumexp(values: torch.Tensor, image: torch.Tensor, bags: int) -> torch.Tensor:
    """``(B,)``: log-sum-exp of ``values`` ``(L,)`` over each bag (very negative for an empty one)."""
    peak = torch.full((bags,), -torch.inf, device=values.device, dtype=values.dtype).scatter_reduce(
        0, image, values.detach(), reduce="amax")
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    sums = torch.zeros_like(peak).index_add(0, image, torch.exp(values - peak[image]))
    return torch.log(sums.clamp_min(torch.finfo(sums.dtype).tiny)) + peak  # finite gradients for empty bags


def _is_class(y: torch.Tensor, classes: int) -> torch.Tensor:
    """``(L, classes)``: True at each row's class (``F.one_hot`` reads the labels back to
    check them; this does not)."""
    return torch.arange(classes, device=y.device) == y[:, None]


def _bag_mean(values: torch.Tensor, image: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``(B,)``: the mean of ``values`` ``(L,)`` over each bag."""
    return torch.zeros_like(n).index_add(0, image, values) / n.clamp_min(1)


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
        coverage: ``(G,)`` object coverage fraction of each cell, same order. Cells a map
            leaves out (``sampling.LEFT_OUT``: outside the image, or off the tissue) are
            not a target.
    """
    terms = []
    for lp, cov in zip(log_maps, coverage):
        cov = cov * drawable(lp.detach())  # cells left out of the map (never drawn) are no target
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
    # which cell each step of each path is (on the host, from the paths alone); the highest
    # score per cell is taken on the device, so nothing waits for the scores
    slot: dict[tuple[int, tuple, int], int] = {}
    step_slot, step_leaf = [], []
    for leaf, path in enumerate(leaf_paths):
        for level, (image, box, cell) in enumerate(path):
            step_slot.append(slot.setdefault((level, (image, box), cell), len(slot)))
            step_leaf.append(leaf)
    if not slot:
        return leaf_scores.new_zeros(())
    device = leaf_scores.device
    best = torch.zeros(len(slot), dtype=leaf_scores.dtype, device=device).scatter_reduce(
        0, torch.tensor(step_slot, device=device), leaf_scores.detach()[torch.tensor(step_leaf, device=device)],
        reduce="amax", include_self=True)  # (S,) a cell's target: the highest score reaching it, at least 0
    keys = list(slot)
    logits, order = [], []
    for lv, table in enumerate(cell_logits):
        chosen = [i for i, (level, _, _) in enumerate(keys) if level == lv]
        if not chosen:
            continue
        cells = [(keys[i][1], keys[i][2]) for i in chosen]
        if hasattr(table, "flat_index"):  # the model's CellTable: one gather per level
            logits.append(table.table().flatten()[table.flat_index(cells)])
        else:
            logits.append(torch.stack([table[parent][cell] for parent, cell in cells]))
        order += chosen
    logits = torch.cat(logits)
    goal = best[torch.tensor(order, device=device)].to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, goal)
