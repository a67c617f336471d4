"""Every metric, in one module: accuracy, balanced accuracy, confusion, AUC, log loss; where
the model looked (sampled sub-tiles on objects, Spearman's rho between attention and object
coverage, attention entropy); what the sampled sub-tiles tell of the label; and the metrics
of a predictions CSV. Used by training, ``zoomnet evaluate``, ``zoomnet predict`` with
labels and ``zoomnet bench``."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from zoomnet.core import sampling

if TYPE_CHECKING:
    from zoomnet.data.examples import Example
    from zoomnet.model import ZoomInOutput


def binary_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney statistic, ties counted half).

    >>> binary_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
    0.75
    """
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy, balanced accuracy, confusion matrix (rows: truth) and AUC when binary."""
    k = probs.shape[1]
    pred = probs.argmax(1)
    confusion = torch.zeros(k, k, dtype=torch.long)
    for t, p in zip(labels.tolist(), pred.tolist()):
        confusion[t, p] += 1
    per_class = [confusion[c, c].item() / confusion[c].sum().item() for c in range(k) if confusion[c].sum() > 0]
    out = {
        "accuracy": float((pred == labels).float().mean()) if len(labels) else float("nan"),
        "balanced_accuracy": sum(per_class) / len(per_class) if per_class else float("nan"),
        "confusion": confusion.tolist(),
    }
    if k == 2:
        out["auc"] = binary_auc(probs[:, 1], labels)
    return out


def log_loss(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean cross-entropy of the predicted probabilities of the true classes.

    >>> round(log_loss(torch.tensor([[0.5, 0.5], [0.1, 0.9]]), torch.tensor([0, 1])), 4)
    0.3993
    """
    true_p = probs[torch.arange(len(labels)), labels]
    return float(-true_p.clamp_min(1e-12).log().mean())


def spearman(x, y) -> float:
    """Spearman's rank correlation, ties given their average rank (nan if either is constant).

    >>> spearman([1, 2, 3, 4], [10, 20, 30, 40]), spearman([1, 2, 3], [3, 2, 1])
    (1.0, -1.0)
    """
    def ranks(v):
        v = np.asarray(v, dtype=np.float64)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, weights=r)
        return sums[inverse] / counts[inverse]  # average rank of each tie group

    rx, ry = ranks(x), ranks(y)
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def leaf_probabilities(out) -> list[float]:
    """Per distinct sampled sub-tile (``out.leaf_paths``), its probability under the
    attention: the product of the cells' probabilities along its path."""
    probs = []
    for path in out.leaf_paths:
        logp = 0.0
        for level, (b, parent, cell) in enumerate(path):
            m = out.parents[level][b].index(parent)
            logp += float(out.log_maps[level][b][m].reshape(-1)[cell])
        probs.append(float(np.exp(logp)))
    return probs


def object_hits(out: ZoomInOutput, examples: list[Example]) -> tuple[int, int, int, int]:
    """Count sampled sub-tiles that overlap an object, on images with an object mask.

    Returns:
        ``(sub-tiles hitting, sub-tiles, images with a hit, images with objects)``.
    """
    if not out.levels:
        return 0, 0, 0, 0
    hit_tiles = tiles = hit_images = images = 0
    for ex, leaves in zip(examples, out.levels[-1].samples):
        if ex.mask is None:
            continue
        if not ex.has_objects():
            continue
        images += 1
        hits = [float(ex.mask.read(s.box).max()) > 0 for s in leaves]
        hit_tiles += sum(hits)
        tiles += len(hits)
        hit_images += any(hits)
    return hit_tiles, tiles, hit_images, images


def attention_entropy(out: ZoomInOutput) -> list[float]:
    """Per level, the mean entropy of its attention maps over that of a uniform map over
    the cells the map may draw (1 = uniform, 0 = all mass on one cell; cells it leaves out,
    outside the image or off the tissue, do not count); maps of one such cell are left out.

    >>> import math
    >>> uniform = torch.full((1, 4), math.log(0.25))
    >>> from zoomnet.model import ZoomInOutput
    >>> attention_entropy(ZoomInOutput(None, None, [], [[uniform]], []))
    [1.0]
    >>> three = torch.log(torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0]])).clamp_min(-1e4)  # one cell left out
    >>> round(attention_entropy(ZoomInOutput(None, None, [], [[three]], []))[0], 6)
    1.0
    """
    return attention_entropy_values(out).tolist()


def attention_entropy_values(out: ZoomInOutput) -> torch.Tensor:
    """:func:`attention_entropy` as a ``(levels,)`` tensor on the maps' device, computed
    without reading anything back (training logs it every few steps)."""
    device = next((lp.device for level in out.log_maps for lp in level), torch.device("cpu"))
    values = []
    for level in out.log_maps:
        ratios, kept = [], []
        for lp in (lp.detach().float() for lp in level if lp.numel()):
            cells = sampling.drawable(lp).sum(-1)  # (M,) cells each map may draw
            kept.append(cells > 1)
            ratios.append(-(lp.exp() * lp).sum(-1) / torch.where(kept[-1], cells, 2).double().log().float())
        if not ratios:
            values.append(torch.tensor(float("nan"), device=device))
            continue
        keep = torch.cat(kept)
        values.append(torch.where(keep, torch.cat(ratios), 0.0).sum() / keep.sum())  # 0 / 0: NaN, no map has two cells
    return torch.stack(values) if values else torch.zeros(0)


def subtile_signal(leaf_logits: torch.Tensor, leaf_image: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over images of the best ``p(image label)`` among its sampled sub-tiles: ``1 /
    classes`` while ``f`` sees nothing in them, near 1 once each image has a telling one."""
    return float(subtile_signal_value(leaf_logits, leaf_image, labels))


def subtile_signal_value(leaf_logits: torch.Tensor, leaf_image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """:func:`subtile_signal` as a 0-d tensor on the logits' device (NaN without sub-tiles),
    computed without reading anything back."""
    probs = torch.softmax(leaf_logits.detach().float(), dim=1)
    image = leaf_image.to(probs.device)
    p_label = probs.gather(1, labels.to(probs.device)[image][:, None]).squeeze(1)  # (L,)
    best = torch.full((len(labels),), float("nan"), device=probs.device).scatter_reduce(
        0, image, p_label, reduce="amax", include_self=False
    )
    return torch.nanmean(best)


def prediction_metrics(rows: list[dict], classes: list[str]) -> dict | None:
    """Metrics of predictions that all carry a true label in ``classes`` (None otherwise):
    ``rows`` of ``{"true_label": ..., "probabilities": {class: p}}`` (``zoomnet predict``'s
    results), or of a predictions CSV (``true_label`` and ``p_<class>`` columns).

    >>> prediction_metrics([{"true_label": "a", "probabilities": {"a": 0.9, "b": 0.1}}], ["a", "b"])["accuracy"]
    1.0
    """
    if not rows or any(r.get("true_label") not in classes for r in rows):
        return None

    def p(row: dict, c: str) -> float:
        return float(row["probabilities"][c]) if "probabilities" in row else float(row[f"p_{c}"])

    probs = torch.tensor([[p(r, c) for c in classes] for r in rows])
    labels = torch.tensor([classes.index(r["true_label"]) for r in rows])
    return {"images": len(rows), **classification_metrics(probs, labels)}


def csv_metrics(out_csv: str | Path) -> dict | None:
    """:func:`prediction_metrics` of a predictions CSV (its classes from its ``p_<class>``
    columns) whose rows all carry a true label; None otherwise."""
    with Path(out_csv).open(newline="") as fh:
        reader = csv.DictReader(fh)
        classes = [c[2:] for c in reader.fieldnames or [] if c.startswith("p_")]
        return prediction_metrics(list(reader), classes)
