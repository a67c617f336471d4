"""The one evaluation loop: validation during training, ``zoomnet evaluate``, the bench."""

from __future__ import annotations

import torch
from tqdm import tqdm

from zoomnet.data.examples import Example, batches_by_size
from zoomnet.metrics import classification_metrics, leaf_probabilities, object_hits, spearman


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, examples: list[Example], batch_size: int = 16, deterministic: bool = False,
    samples: int | None = None, seed: int = 0, progress: bool = False, desc: str = "evaluate",
    localization: bool = False, draw_sets: int = 1, flag: float = 0.05,
) -> dict:
    """The one evaluation loop (validation in :func:`fit`, ``zoomnet evaluate``, the bench).

    Returns:
        :func:`zoomnet.metrics.classification_metrics` (``accuracy``, ``balanced_accuracy``,
        ``confusion``, ``auc`` when binary), ``hit_rate`` (share of sampled sub-tiles on an
        object, images with objects), ``images_hit`` (share of those images with at least
        one such sub-tile), ``images_with_objects``, ``probabilities`` (``(n, classes)`` in
        the order of ``examples``) and ``labels``; with ``localization``, ``spearman``:
        Spearman's rho between each sampled sub-tile's attention probability and the
        fraction of it that objects cover, over images with objects. With ``draw_sets`` R > 1
        each image is predicted from R independent draw sets (the mean of their logits) and
        flagged uncertain where another estimate would flip its class with a chance above
        ``flag``: ``uncertain`` (the share flagged), ``uncertain_error``, ``confident_error``
        (the error rate of each group; NaN where it is empty).
    """
    if draw_sets > 1:
        return _evaluate_draw_sets(model, examples, samples, seed, draw_sets, flag, progress, desc)
    generator = torch.Generator().manual_seed(seed)
    model = getattr(model, "module", model)
    probs = torch.zeros(len(examples), model.config.num_classes)
    hits = [0, 0, 0, 0]
    leaf_p, covers = [], []
    batches = batches_by_size(examples, batch_size, shuffle=False)
    bar = tqdm(total=len(examples), desc=desc, unit="image", disable=not progress, leave=False)
    for idx in batches:
        bar.update(len(idx))
        batch = [examples[i] for i in idx]
        out = model.predict([ex.source for ex in batch], deterministic=deterministic, samples=samples, generator=generator)
        probs[idx] = torch.softmax(out.logits.float(), dim=1).cpu()
        hits = [a + b for a, b in zip(hits, object_hits(out, batch))]
        if localization and out.leaf_paths:
            for path, box, p in zip(out.leaf_paths, out.leaf_boxes, leaf_probabilities(out)):
                ex = batch[path[0][0]]
                if ex.mask is not None and ex.has_objects():
                    leaf_p.append(p)
                    covers.append(float(ex.mask.read(box).mean()))
    bar.close()
    labels = torch.tensor([ex.label for ex in examples], dtype=torch.long)
    result = {
        **classification_metrics(probs, labels),
        # undefined without masks (or objects): NaN, written as null / an empty cell
        "hit_rate": hits[0] / hits[1] if hits[1] else float("nan"),
        "images_hit": hits[2] / hits[3] if hits[3] else float("nan"),
        "images_with_objects": hits[3],
        "probabilities": probs,
        "labels": labels,
    }
    if localization:
        result["spearman"] = spearman(leaf_p, covers) if leaf_p else float("nan")
    return result


def _evaluate_draw_sets(model, examples: list[Example], samples: int | None, seed: int, sets: int, flag: float,
                        progress: bool, desc: str) -> dict:
    """:func:`evaluate` with ``sets`` draw sets per image, and its flags."""
    from zoomnet.uncertainty import draw_set_statistics, predict_draw_sets

    generator = torch.Generator().manual_seed(seed)
    model = getattr(model, "module", model)
    probs = torch.zeros(len(examples), model.config.num_classes)
    flagged = torch.zeros(len(examples), dtype=torch.bool)
    hits = [0, 0, 0, 0]
    for i, ex in enumerate(tqdm(examples, desc=desc, unit="image", disable=not progress, leave=False)):
        logits, out = predict_draw_sets(model, ex.source, None, sets, samples, generator)
        stats = draw_set_statistics(logits)
        probs[i], flagged[i] = stats.probabilities, stats.flip > flag
        hits = [a + b for a, b in zip(hits, object_hits(out, [ex] * sets))]
    labels = torch.tensor([ex.label for ex in examples], dtype=torch.long)
    wrong = probs.argmax(1) != labels

    def error(sel: torch.Tensor) -> float:
        return float(wrong[sel].float().mean()) if sel.any() else float("nan")

    return {
        **classification_metrics(probs, labels),
        "hit_rate": hits[0] / hits[1] if hits[1] else float("nan"),
        "images_hit": hits[2] / hits[3] if hits[3] else float("nan"),
        "images_with_objects": hits[3] // sets,
        "probabilities": probs, "labels": labels, "draw_sets": sets,
        "uncertain": float(flagged.float().mean()), "uncertain_error": error(flagged), "confident_error": error(~flagged),
    }
