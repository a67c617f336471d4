"""Classification and localisation metrics: accuracy, balanced accuracy, confusion, AUC,
log loss, and Spearman's rho between sampled sub-tiles' attention and object coverage. One module for
the training loop's validation, ``zoomnet evaluate``, ``zoomnet predict`` with labels and
``zoomnet bench``."""

from __future__ import annotations

import numpy as np
import torch


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
