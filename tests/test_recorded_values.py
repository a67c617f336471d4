"""Fixed-seed values of every preset's model, recorded once: a change meant to keep behaviour
(a refactor, a speed-up) must reproduce them.

For each case the model is built from its preset with a fixed seed, run in training mode on
two generated images (draws, logits, the contrastive logits), its training loss assembled
with every term on and back-propagated (loss terms, a digest of every parameter's gradient),
then predicted deterministically and by sampling. ``python tests/test_recorded_values.py
--write`` records the values anew (only when a change is *meant* to alter them; say why in
the commit).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

RECORDED = Path(__file__).with_name("data") / "recorded_values.json"

# case: (preset, image height, image width, overrides); the image is the preset's size, or
# one that exercises its geometry (tiles sticking out, strips, tissue on glass)
CASES = {
    "colon-cancer": ("colon-cancer", 500, 500, []),
    "colon-cancer-ats": ("colon-cancer", 500, 500, ["model.kind=ats"]),
    "colon-cancer-cnn": ("colon-cancer", 500, 500, ["model.kind=cnn", "model.cnn_scale=0.25"]),
    # zoomnet 0.1.0's attention net (a 1x1 head): its values were recorded with that release
    "colon-cancer-head-1x1": ("colon-cancer", 500, 500, ["model.attention_head=1x1"]),
    "needle-camelyon": ("needle-camelyon", 384, 384, []),
    "tiny-objects": ("tiny-objects", 512, 512, []),
    "megapixel-mnist": ("megapixel-mnist", 600, 600, []),
    "traffic-signs": ("traffic-signs", 400, 560, []),
    "fmow": ("fmow", 600, 720, []),
    "camelyon16": ("camelyon16", 2100, 2100, ["model.strip_rows=24", "model.tissue_mask=true"]),
    "three-levels": ("tiny-objects", 512, 512, [
        'model.levels=[{"scale": 0.125, "region": [256, 256]}, {"scale": 0.25, "region": [64, 64]}, '
        '{"scale": 0.5, "region": [16, 16], "stride": [8, 8]}]']),
}
REFERENCE = {"megapixel-mnist": None, "fmow": None, "traffic-signs": 3}  # else class 0


def _image(seed: int, height: int, width: int, glass: bool) -> tuple[np.ndarray, np.ndarray]:
    """A textured image with a few bright squares (the objects) and their mask; with
    ``glass``, the right half is white glass."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(60, 200, (height // 16 + 1, width // 16 + 1, 3))
    img = np.repeat(np.repeat(coarse, 16, axis=0), 16, axis=1)[:height, :width]
    img = img + rng.normal(0, 12, img.shape)
    mask = np.zeros((height, width), np.uint8)
    for _ in range(3):
        s = int(rng.integers(12, 28))
        y, x = int(rng.integers(0, height - s)), int(rng.integers(0, width // 2 - s))
        img[y : y + s, x : x + s] = (250, 30, 30)
        mask[y : y + s, x : x + s] = 1
    if glass:
        img[:, width // 2 :] = 245
    return np.clip(img, 0, 255).astype(np.uint8), mask


def _floats(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.detach().double().flatten()]


def _draws(out) -> list:
    return [[[[*s.box, s.count, s.cell] for s in per_image] for per_image in lv.samples] for lv in out.levels]


def compute(case: str) -> dict:
    """The recorded quantities of one case (see the module docstring)."""
    from zoomnet.config import load_config
    from zoomnet.data.examples import Example
    from zoomnet.model import build_model
    from zoomnet.objective import training_loss
    from zoomnet.sources import ArraySource

    preset, height, width, overrides = CASES[case]
    config = load_config(preset, ["train.mask_weight=1", *overrides])
    cfg = config.train
    cfg.reference_class = REFERENCE.get(preset, 0)
    cfg.reference_share = 0.5 if cfg.reference_class is not None else None
    torch.manual_seed(0)
    model = build_model(config.model).double()
    glass = config.model.tissue_mask
    batch = []
    for i in range(2):
        img, mask = _image(i, height, width, glass)
        batch.append(Example(ArraySource(img, fill=config.data.fill), i, ArraySource(mask, rgb=False), f"image-{i}"))
    labels = torch.tensor([0, 1])
    sources = [ex.source for ex in batch]
    model.train()
    out = model(sources, contrastive=True, generator=torch.Generator().manual_seed(1))
    loss, terms = training_loss(model, out, batch, labels, cfg, contrastive=True)
    loss.backward()
    values = {
        "logits": _floats(out.logits),
        "z": [float(out.z.detach().sum()), float(out.z.detach().abs().sum())],
        "draws": _draws(out),
        "loss": float(loss.detach()),
        "terms": {k: float(v) for k, v in terms.items()},
        "grads": {n: [float(p.grad.double().sum()), float(p.grad.double().abs().sum())]
                  for n, p in model.named_parameters() if p.grad is not None},
    }
    if out.contrastive_logits is not None:
        values["contrastive_logits"] = _floats(out.contrastive_logits)
    det = model.predict(sources, deterministic=True)
    sampled = model.predict(sources, generator=torch.Generator().manual_seed(2))
    values.update(predict_deterministic=_floats(det.logits), predict_sampled=_floats(sampled.logits),
                  predict_draws=_draws(sampled))
    return values


def _close(got, want, path: str) -> None:
    if isinstance(want, dict):
        assert set(got) == set(want), f"{path}: keys {sorted(set(got) ^ set(want))} differ"
        for k in want:
            _close(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), f"{path}: {len(got)} items, recorded {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        # float64 throughout: only the order of additions may differ
        assert got == pytest.approx(want, rel=1e-7, abs=1e-9), f"{path}: {got!r}, recorded {want!r}"
    else:
        assert got == want, f"{path}: {got!r}, recorded {want!r}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_recorded_values_are_reproduced(case):
    recorded = json.loads(RECORDED.read_text())
    assert case in recorded, f"{case}: not recorded; run python tests/test_recorded_values.py --write"
    _close(compute(case), recorded[case], case)


if __name__ == "__main__":
    if "--write" not in sys.argv:
        sys.exit("usage: python tests/test_recorded_values.py --write [CASE ...]   (records the values anew)")
    RECORDED.parent.mkdir(exist_ok=True)
    chosen = [a for a in sys.argv[1:] if a != "--write"] or sorted(CASES)
    recorded = json.loads(RECORDED.read_text()) if RECORDED.is_file() else {}
    recorded.update({case: compute(case) for case in chosen})
    lines = [f"{json.dumps(case)}: {json.dumps(recorded[case], separators=(',', ':'))}" for case in sorted(recorded)]
    RECORDED.write_text("{\n" + ",\n".join(lines) + "\n}\n")  # a case a line
    print(f"wrote {RECORDED}")
