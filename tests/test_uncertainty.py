"""zoomnet.uncertainty: the standard errors and flip chances of draw sets, checked against
expectations enumerated exactly on an image small enough, and predict's output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from zoomnet import ArraySource, LevelConfig, ModelConfig
from zoomnet.cli import main
from zoomnet.model import build_model
from zoomnet.uncertainty import draw_set_statistics, t_quantile


def _setup(bias: float = 0.0, seed: int = 0):
    """ATS over a dense 6x8 grid of a 24x32 image (48 cells), N = 4: the exact expectation of
    ``z`` is the attention-weighted sum of every cell's feature, enumerated below."""
    torch.manual_seed(seed)
    cfg = ModelConfig(kind="ats", levels=[LevelConfig(0.25, (8, 8), "dense")], samples=4,
                      feature_kwargs={"width": 4, "out_dim": 4})
    model = build_model(cfg).double().eval()
    with torch.no_grad():
        model.classifier.linear.bias[1] += bias
    image = np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    src = ArraySource(image)
    with torch.inference_mode():
        out = model.predict([src], deterministic=True)
        (alpha,) = out.levels[0].maps[0].values()
        rel = model._level_grid(0, (24, 32)).rel
        from zoomnet.core.geometry import Box

        feats = model.feature(model.normalize(torch.stack([src.read(Box(*r.tolist())) for r in rel])))
        exact = model.classifier((alpha.double()[:, None] * feats.double()).sum(0, keepdim=True))[0]
    return model, src, exact


def _draw_set_logits(model, src, n: int, seed: int) -> torch.Tensor:
    """``(n, C)`` logits of n independent draw sets, in batches."""
    g = torch.Generator().manual_seed(seed)
    parts = [model.predict([src] * min(2000, n - i), generator=g).logits.double() for i in range(0, n, 2000)]
    return torch.cat(parts)


@pytest.mark.slow  # 40,000 draw sets
def test_the_95_percent_interval_covers_the_exact_expectation_in_95_percent_of_trials():
    """2,000 trials of R = 20 draw sets each: the nominal 95 % interval of each class
    probability (and of the logit margin, linear in z) covers the value of the exact
    expected aggregate, enumerated, in 93-97 % of trials. Tolerance: a binomial count of
    2,000 at 95 % has a standard deviation of 0.49 points, so 93-97 % is four of them."""
    model, src, exact = _setup()
    p_exact = torch.softmax(exact, 0)
    R, trials = 20, 2000
    logits = _draw_set_logits(model, src, R * trials, seed=1).view(trials, R, -1)
    t = t_quantile(0.975, R - 1)
    covered_p = covered_m = 0
    for trial in logits:
        stats = draw_set_statistics(trial)
        covered_p += bool((stats.probabilities[1] - p_exact[1]).abs() <= t * stats.standard_error[1])
        margins = trial[:, 1] - trial[:, 0]
        se = margins.std() / R**0.5
        covered_m += bool((margins.mean() - (exact[1] - exact[0])).abs() <= t * se)
    assert 0.93 <= covered_p / trials <= 0.97, covered_p / trials
    assert 0.93 <= covered_m / trials <= 0.97, covered_m / trials


@pytest.mark.slow  # 36,000 draw sets
def test_the_flip_chance_is_calibrated():
    """Images whose exact margin sweeps across the boundary: the stated chance that another
    estimate of the same size predicts another class, against how often a fresh one does
    (4,000 draw sets per image; trials of R = 10 from them). Tolerance: within a binomial
    three standard errors of the observed frequency plus 2 points, per bin of stated
    chances and overall."""
    R = 10
    stated, happened = [], []
    for k, bias in enumerate(np.linspace(-0.6, 0.6, 9)):
        model, src, exact = _setup(float(bias), seed=0)
        pool = _draw_set_logits(model, src, 4000, seed=10 + k)
        rng = np.random.default_rng(k)
        for _ in range(300):
            idx = rng.choice(len(pool), 2 * R, replace=False)
            stats = draw_set_statistics(pool[idx[:R]])
            fresh = pool[idx[R:]].mean(0)  # another estimate of the same size
            stated.append(stats.flip)
            happened.append(float(int(fresh.argmax()) != stats.predicted))
    stated, happened = np.array(stated), np.array(happened)

    def tolerance(sel) -> float:
        f = happened[sel].mean()
        return 3 * np.sqrt(max(f * (1 - f), 0.01) / sel.sum()) + 0.02

    everything = np.ones(len(stated), bool)
    assert abs(stated.mean() - happened.mean()) < tolerance(everything), (stated.mean(), happened.mean())
    for lo, hi in ((0.0, 0.05), (0.05, 0.2), (0.2, 0.5)):
        sel = (stated >= lo) & (stated < hi)
        if sel.sum() >= 50:
            assert abs(stated[sel].mean() - happened[sel].mean()) < tolerance(sel), (lo, hi, sel.sum())


def test_predict_reports_how_sure_each_prediction_is(data, run, tmp_path, capsys):
    out = tmp_path / "p.csv"
    image = str(data / "set/images/tiny_00001.png")
    assert main(["predict", str(run), image, "--draw-sets", "6", "--out", str(out), "--quiet",
                 "--geojson", str(tmp_path / "g")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    u = result["uncertainty"]
    assert u["draw_sets"] == 6 and u["draws"] == 6 * 4 and 0 <= u["flip_probability"] <= 1
    assert set(u["standard_error"]) == {"negative", "positive"} and all(v >= 0 for v in u["standard_error"].values())
    header = out.read_text().splitlines()[0].split(",")
    assert header[-4:] == ["se_negative", "se_positive", "flip", "draws"]
    geo = json.loads(next((tmp_path / "g").glob("*.geojson")).read_text())
    assert geo["properties"]["uncertainty"]["draw_sets"] == 6
    assert main(["predict", str(run), image, "--samples", "auto", "--quiet"]) == 0
    auto = json.loads(capsys.readouterr().out.strip().splitlines()[0])["uncertainty"]
    assert 2 <= auto["draw_sets"] <= 8 and auto["draws"] == auto["draw_sets"] * 1  # rounds of N / 4 = 1 draw
    assert main(["predict", str(run), image, "--draw-sets", "4", "--deterministic", "--quiet"]) == 2
    assert "deterministic draws are the same every time" in capsys.readouterr().err


def test_evaluate_reports_the_error_of_flagged_and_confident_images(data, run, capsys):
    assert main(["evaluate", str(run), str(data / "set/test.csv"), "--draw-sets", "5", "--quiet"]) == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert m["draw_sets"] == 5 and 0 <= m["uncertain"] <= 1
    for key in ("uncertain_error", "confident_error"):
        assert m[key] is None or 0 <= m[key] <= 1  # null where the group is empty
    assert (m["uncertain_error"] is None) == (m["uncertain"] == 0)
