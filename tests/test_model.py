"""zoomnet.model: the hierarchy, exact by enumeration, batched as the plain sum, reading each region once, staying on tissue and inside the image."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from zoomnet import (
    ArraySource,
    CountingSource,
    LevelConfig,
    ModelConfig,
    ZoomIn,
    build_model,
)
from zoomnet.core import sampling
from zoomnet.core.geometry import (
    Box,
    cell_boxes,
)
from zoomnet.nets import available
from helpers import tissue_on_glass


def test_estimator_stays_float32_under_autocast():
    from zoomnet import ArraySource, LevelConfig, ModelConfig, ZoomIn

    model = ZoomIn(ModelConfig(levels=[LevelConfig(0.25, (32, 32)), LevelConfig(0.5, (16, 16), (8, 8))], samples=4))
    src = ArraySource(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model([src], contrastive=True, generator=torch.Generator().manual_seed(0))
    assert out.log_maps[0][0].dtype == torch.float32 and out.log_maps[1][0].dtype == torch.float32
    assert out.z.dtype == torch.float32 and torch.isfinite(out.logits).all()


def tiny_enumerable_model() -> tuple[ZoomIn, ArraySource]:
    """An 8x16 image: level 1 has 2 tiles (8x8), level 2 has 3 cells per tile (stride 8/3)."""
    cfg = ModelConfig(
        levels=[LevelConfig(0.5, (8, 8), "tiled"), LevelConfig(0.5, (8, 4), (8.0, 8 / 3))],
        attention_width=4, feature_kwargs={"width": 4, "out_dim": 3},
    )
    torch.manual_seed(0)
    model = ZoomIn(cfg).double()
    image = np.random.default_rng(0).integers(0, 255, (8, 16, 3), dtype=np.uint8)
    return model, ArraySource(image)


def draw_orders(beta: torch.Tensor, k: int) -> list[tuple[tuple[int, ...], float]]:
    """Every ordered draw of ``k`` distinct cells by successive sampling from ``beta``, with
    its probability (the law Gumbel-top-k draws from)."""
    options = []
    for draws in itertools.permutations(range(len(beta)), k):
        prob, left = 1.0, 1.0
        for d in draws:
            prob *= float(beta[d]) / left
            left -= float(beta[d])
        options.append((draws, prob))
    return options


@pytest.mark.parametrize("path", ["training", "contrastive", "inference"])
def test_model_estimator_is_exactly_unbiased(monkeypatch, path):
    """Enumerate every outcome of the real model's draws (N = 4 over 2 tiles of 3 cells:
    parents drawn less often, as often and more often than they have cells) and compare
    E[w.z] and E[grad] over all parameters with the exact aggregate; for the contrastive
    pass, with the complementary maps at every level; at inference (no gradients, f in
    chunks of 2 sub-tiles), the value."""
    contrastive = path == "contrastive"
    model, src = tiny_enumerable_model()
    model.config.chunk = 2
    model.classifier = torch.nn.Identity()  # logits = z: the contrastive pass's z is its logits
    N, w = 4, torch.tensor([0.3, -1.0, 0.7], dtype=torch.float64)
    params = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]
    maps = sampling.complement_log_probs if contrastive else (lambda lp: lp)

    # exact: sum_c alpha_c sum_c' beta_c' f(c, c'), through the model's own pieces
    view = model.read_views([src])
    log_alpha, _ = model._attention_maps(0, view, (8, 16))  # (1, 2)
    log_alpha = maps(log_alpha)
    rel1 = model._level_grid(0, (8, 16)).rel
    rel2 = model._level_grid(1, (8, 8)).rel
    exact = 0.0
    log_betas = []
    for c in range(2):
        tile = Box(*rel1[c].tolist())
        lb, _ = model._attention_maps(1, src.read(tile, (4, 4))[None], (8, 8))  # (1, 3)
        lb = maps(lb)
        log_betas.append(lb[0])
        for c2 in range(3):
            t, l, h, ww = rel2[c2].tolist()
            feat = model.feature(model.normalize(src.read(Box(tile.top + t, tile.left + l, h, ww))[None]))[0]
            exact = exact + log_alpha[0, c].exp() * lb[0, c2].exp() * (w @ feat)
    exact_grads = torch.autograd.grad(exact, params)
    alpha = log_alpha.detach().exp()[0]
    betas = [lb.detach().exp() for lb in log_betas]

    state: dict = {}
    monkeypatch.setattr(sampling, "sample_with_replacement", lambda lp, n, g=None: state["counts"].clone())
    monkeypatch.setattr(sampling, "sample_without_replacement", lambda lp, k, g=None: state["order"][:, :k])

    expected, total_p = 0.0, 0.0
    for k0 in range(N + 1):
        counts = torch.tensor([[k0, N - k0]])
        p_counts = math.comb(N, k0) * float(alpha[0]) ** k0 * float(alpha[1]) ** (N - k0)
        parents = [c for c in range(2) if counts[0, c] > 0]
        options = []
        for c in parents:
            k = int(counts[0, c])
            options.append([((0, 1, 2), 1.0)] if k >= 3 else draw_orders(betas[c], k))
        for combo in itertools.product(*options):
            rows = [list(d) + [x for x in range(3) if x not in d] for d, _ in combo]
            state["counts"], state["order"] = counts, torch.tensor(rows)
            p = p_counts * math.prod(q for _, q in combo)
            if path == "inference":
                out = model.predict([src], samples=N)
            else:
                out = model([src], samples=N, contrastive=contrastive)
            z = out.contrastive_logits[0] if contrastive else out.z[0]
            expected = expected + p * (w @ z)
            total_p += p
    assert total_p == pytest.approx(1.0, abs=1e-12)
    assert abs(float((expected - exact).detach())) < 1e-10
    if path == "inference":
        return
    expected_grads = torch.autograd.grad(expected, params)
    for e, x in zip(expected_grads, exact_grads):
        assert torch.allclose(e, x, atol=1e-10, rtol=0)


@pytest.mark.parametrize("path", ["training", "inference"])
def test_overlapping_tiles_add_the_weights_of_a_shared_sub_tile(monkeypatch, path):
    """Exact enumeration where two parents reach the same sub-tile, with the exact answer
    built from this test's own statement of the geometry and pooling (only the nets and
    the source's reads are the model's).

    An 8x12 image; level 1: 8x8 tiles at stride (8, 4), so 3 tiles with lefts -2, 2, 6
    (cell centre x = 2 + 4j, left = floor(centre) - 4); at scale 1/2 the 4x6 view's pixel
    columns (centres 1, 3, ..., 11) pool in pairs into the 3 cells. Level 2: 8x4 sub-tiles at
    stride (8, 2) in a tile, 4 cells with lefts -1, 1, 3, 5 relative to the tile; the tile's
    4x4 view pools column by column. Sub-tiles at lefts 1, 3 (tiles 1 and 2) and 5, 7
    (tiles 2 and 3) are reached by two parents, so their weights must add. Sub-tiles whose
    centre lies outside the image (left -3 in tile 1, left 11 in tile 3: they would show
    the fill) are never drawn: their tile's map is renormalised over the other three; the
    view columns of tiles 1 and 3 centred outside the image repeat the image's edge."""
    cfg = ModelConfig(
        levels=[LevelConfig(0.5, (8, 8), (8.0, 4.0)), LevelConfig(0.5, (8, 4), (8.0, 2.0))],
        attention_width=4, feature_kwargs={"width": 4, "out_dim": 3}, smooth=0.1,
    )
    torch.manual_seed(1)
    model = ZoomIn(cfg).double()
    model.config.chunk = 3
    src = ArraySource(np.random.default_rng(1).integers(0, 255, (8, 12, 3), dtype=np.uint8))
    from zoomnet.model.zoomin import attend as _attend

    def probs(view: torch.Tensor, level: int, groups: list[list[int]], out: int | None = None) -> torch.Tensor:
        # the test's pooling: a cell's logit is the logsumexp of its view columns (all rows)
        logits, _ = _attend(model.attention[level], model.normalize(view[None]))  # (1, h, w)
        cells = torch.stack([torch.logsumexp(logits[0][:, cols].flatten(), 0) for cols in groups])
        p = 0.9 * torch.softmax(cells, 0) + 0.1 / len(groups)
        if out is not None:  # a cell outside the image: never drawn
            p = p * (torch.arange(len(groups)) != out).to(p.dtype)
            p = p / p.sum()
        return p

    tiles = [Box(0, left, 8, 8) for left in (-2, 2, 6)]
    sub_lefts = (-1, 1, 3, 5)
    alpha_p = probs(src.read(Box(0, 0, 8, 12), (4, 6)), 0, [[0, 1], [2, 3], [4, 5]])
    def tile_view(tile: Box) -> torch.Tensor:
        # the 4x4 view, its columns centred outside the image repeating the image's edge
        view = src.read(tile, (4, 4))
        centres = [tile.left + 1 + 2 * j for j in range(4)]
        inside = [j for j, c in enumerate(centres) if 0 <= c < 12]
        return view[:, :, [min(max(j, inside[0]), inside[-1]) for j in range(4)]]

    beta_p = [probs(tile_view(t), 1, [[0], [1], [2], [3]], out) for t, out in zip(tiles, (0, None, 3))]
    boxes = [[Box(0, t.left + dl, 8, 4) for dl in sub_lefts] for t in tiles]
    assert boxes[0][2] == boxes[1][0] and boxes[1][3] == boxes[2][1]  # shared sub-tiles
    w = torch.tensor([0.3, -1.0, 0.7], dtype=torch.float64)
    feat = {b: model.feature(model.normalize(src.read(b)[None]))[0] for row in boxes for b in row}
    exact = sum(alpha_p[c] * beta_p[c][j] * (w @ feat[boxes[c][j]]) for c in range(3) for j in range(4))
    params = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]
    exact_grads = torch.autograd.grad(exact, params)
    alpha = alpha_p.detach()
    betas = [b.detach() for b in beta_p]

    state: dict = {}
    monkeypatch.setattr(sampling, "sample_with_replacement", lambda lp, n, g=None: state["counts"].clone())
    monkeypatch.setattr(sampling, "sample_without_replacement", lambda lp, k, g=None: state["order"][:, :k])
    N, expected, total_p = 2, 0.0, 0.0
    for counts in [c for c in itertools.product(range(N + 1), repeat=3) if sum(c) == N]:
        p_counts = math.factorial(N) * math.prod(float(alpha[c]) ** k / math.factorial(k) for c, k in enumerate(counts))
        options = [draw_orders(betas[c], k) for c, k in enumerate(counts) if k > 0]
        for combo in itertools.product(*options):
            state["counts"] = torch.tensor([counts])
            state["order"] = torch.tensor([list(d) + [x for x in range(4) if x not in d] for d, _ in combo])
            p = p_counts * math.prod(q for _, q in combo)
            if p == 0:  # a draw of a cell outside the image: it never happens
                continue
            out = model.predict([src], samples=N) if path == "inference" else model([src], samples=N)
            expected = expected + p * (w @ out.z[0])
            total_p += p
    assert total_p == pytest.approx(1.0, abs=1e-12)
    assert abs(float((expected - exact).detach())) < 1e-10
    if path == "training":
        for e, x in zip(torch.autograd.grad(expected, params), exact_grads):
            assert torch.allclose(e, x, atol=1e-10, rtol=0)


def sequential_z(model: ZoomIn, sources, n: int) -> torch.Tensor:
    """The deterministic aggregate ``z`` computed the slow, plain way: image by image,
    parent by parent, one sub-tile at a time, with the per-parent estimator formulas."""
    from zoomnet.core import expectation
    from zoomnet.core.geometry import cells_in_image
    from zoomnet.model.cells import restrict as _restrict
    from zoomnet.model.reading import repeat_edges as _repeat_edges

    def drawable(lp: torch.Tensor, box: Box, level: int, parent_hw) -> tuple[torch.Tensor, torch.Tensor]:
        # a parent's map over the cells that reach the image (the others show the fill)
        g = model._level_grid(level, parent_hw)
        ok = cells_in_image(torch.tensor([[box.top, box.left]]), g.rel, g.grid, *hw)
        return (lp if bool(ok.all()) else _restrict(lp, ok)), ok[0]

    zs = []
    for src in sources:
        hw = (src.height, src.width)
        la, _ = model._attention_maps(0, model.read_views([src]), hw)  # (1, G1)
        la, _ = drawable(la, Box(0, 0, *hw), 0, hw)
        counts = sampling.largest_remainder_counts(la, n)[0]
        w1 = expectation.with_replacement_weights(la[0], counts)
        *_, rel = model._level_grid(0, hw)
        frontier = [(Box(*rel[c].tolist()), w1[c], int(counts[c])) for c in torch.nonzero(counts).flatten().tolist()]
        for level in range(1, len(model.config.levels)):
            parent_hw = tuple(model.config.levels[level - 1].region)
            vs, _, _, _, rel = model._level_grid(level, parent_hw)
            children = []
            for box, w, k in frontier:
                view = _repeat_edges(src.read(box, vs)[None], [box], *hw)
                lb, _ = model._attention_maps(level, view, parent_hw)  # (1, G)
                lb, ok = drawable(lb, box, level, parent_hw)
                if k >= int(ok.sum()):
                    draws = torch.nonzero(ok).flatten()
                    ws = lb[0].exp()[draws]
                else:
                    draws = sampling.top_k_children(lb, k)[0]
                    ws = expectation.without_replacement_weights(lb, draws[None])[0]
                for c, wc in zip(draws.tolist(), ws):
                    t, l, h, ww = rel[c].tolist()
                    children.append((Box(box.top + t, box.left + l, h, ww), w * wc, 1))
            frontier = children
        zs.append(sum(w * model.feature(model.normalize(src.read(box)[None]))[0] for box, w, _ in frontier))
    return torch.stack(zs)


@pytest.mark.parametrize("levels", [
    [LevelConfig(0.25, (32, 32), (16.0, 16.0)), LevelConfig(0.5, (12, 12), (4.0, 4.0))],  # overlapping tiles
    [LevelConfig(0.25, (32, 32)), LevelConfig(0.5, (16, 16), (8.0, 8.0)), LevelConfig(1.0, (4, 4), "dense")],
])
@pytest.mark.parametrize("n", [3, 40])  # few draws; enough that parents take every cell
def test_batched_hierarchy_equals_the_sequential_sum(levels, n):
    """Every level weighted in one batch of tensor operations gives the same ``z`` and the
    same gradients as the plain sum computed image by image and parent by parent."""
    cfg = ModelConfig(levels=levels, samples=n, smooth=0.1, attention_width=4, feature_kwargs={"width": 4, "out_dim": 3})
    torch.manual_seed(0)
    model = ZoomIn(cfg).double()
    rng = np.random.default_rng(1)
    sources = [ArraySource(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)) for _ in range(3)]
    params = [p for name, p in model.named_parameters() if not name.startswith("classifier.")]
    batched = model(sources, deterministic=True).z
    plain = sequential_z(model, sources, n)
    torch.testing.assert_close(batched, plain, rtol=0, atol=1e-12)
    w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((batched @ w).sum(), params), torch.autograd.grad((plain @ w).sum(), params)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def counting_setup(seed: int = 0):
    cfg = ModelConfig(
        levels=[LevelConfig(0.125, (64, 64), "tiled"), LevelConfig(0.5, (16, 16), (4.0, 4.0))],
        samples=12,
    )
    image = np.random.default_rng(seed).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    return ZoomIn(cfg), CountingSource(ArraySource(image))


def test_reads_only_views_and_sub_tiles_once():
    model, src = counting_setup()
    out = model.predict([src], generator=torch.Generator().manual_seed(0))
    full = src.full_resolution_reads()
    assert full, "sub-tiles are read at full resolution"
    assert all(b.height <= 16 and b.width <= 16 for b in full)  # never more than a sub-tile
    assert Box(0, 0, 256, 256) not in full  # the whole image is read only as a view
    assert len(full) == len(set(full))  # each distinct sub-tile once
    assert set(full) == set(out.leaf_boxes)
    views = [(b, s) for b, s in src.reads if s is not None and tuple(s) != (b.height, b.width)]
    tiles = [b for b, s in views if b.height == 64]
    assert len(tiles) == len(set(tiles))  # each distinct tile's attention computed once
    assert sum(b.height * b.width for b in full) <= 12 * 16 * 16


@pytest.mark.parametrize("feature", available("feature"))
@pytest.mark.parametrize("kind", ["zoomin", "ats", "cnn", "zoomin3"])
def test_forward_backward_smoke(kind, feature):
    levels = {
        "zoomin": [LevelConfig(0.25, (32, 32)), LevelConfig(0.5, (16, 16), "dense")],
        "ats": [LevelConfig(0.25, (16, 16), "dense")],
        "cnn": [LevelConfig(0.25, (16, 16))],
        "zoomin3": [LevelConfig(0.125, (64, 64)), LevelConfig(0.25, (32, 32)), LevelConfig(0.5, (16, 16), (8, 8))],
    }[kind]
    cfg = ModelConfig(kind=kind.rstrip("3"), levels=levels, feature=feature, num_classes=3, samples=5, cnn_scale=0.5)
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(0)
    srcs = [ArraySource(np.random.default_rng(i).integers(0, 255, (96, 128, 3), dtype=np.uint8)) for i in range(2)]
    out = model(srcs, contrastive=kind != "cnn", generator=gen)
    assert out.logits.shape == (2, 3)
    assert torch.isfinite(out.logits).all()
    loss = out.logits.logsumexp(1).sum()
    if out.contrastive_logits is not None:
        loss = loss + out.contrastive_logits.sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    if kind != "cnn":
        assert len(out.levels) == len(levels)
        assert all(len(s) > 0 for s in out.levels[-1].samples)


@pytest.mark.parametrize("prior", [0.0, 1.0])
def test_training_after_predict_reuses_its_caches(prior):
    """``predict`` runs in inference mode, whose tensors cannot be saved for a backward pass:
    what it caches (level grids, the prior's neighbourhood counts) must still train."""
    from zoomnet.nets import attention

    attention._COUNTS.clear()
    # uneven tiles (24 px over 64 x 96): level 1 pools its cells by index_add, which saves the
    # cached segment index for the backward pass
    cfg = ModelConfig(levels=[LevelConfig(0.25, (24, 24), "tiled"), LevelConfig(0.5, (12, 12), (6, 6))],
                      samples=4, attention_prior=prior)
    model = build_model(cfg)
    srcs = [ArraySource(np.random.default_rng(i).integers(0, 255, (64, 96, 3), dtype=np.uint8)) for i in range(2)]
    out = model.predict(srcs, generator=torch.Generator().manual_seed(0))
    assert torch.is_inference(out.logits)  # the fast path was taken
    model.train()
    out = model(srcs, contrastive=True, generator=torch.Generator().manual_seed(0))
    (out.logits.logsumexp(1).sum() + out.contrastive_logits.sum()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_chunked_inference_equals_one_pass():
    model, src = counting_setup()
    a = model.predict([src], generator=torch.Generator().manual_seed(3))
    model.config.chunk = 3
    b = model.predict([src], generator=torch.Generator().manual_seed(3))
    assert torch.allclose(a.logits, b.logits, atol=1e-5)


@pytest.mark.parametrize("feature", ["lenet", "resnet"])
def test_training_in_heap_sized_chunks_gives_the_values_and_gradients_of_one_call(monkeypatch, feature):
    from zoomnet.model import chunks as allocator

    cfg = ModelConfig(levels=[LevelConfig(0.125, (64, 64), "tiled"), LevelConfig(0.5, (16, 16), (4.0, 4.0))],
                      samples=12, feature=feature, num_classes=3)
    srcs = [ArraySource(np.random.default_rng(i).integers(0, 255, (256, 256, 3), dtype=np.uint8)) for i in range(2)]
    torch.manual_seed(0)
    model = ZoomIn(cfg).train()
    calls = {"feature": [], "attention": []}
    model.feature.register_forward_hook(lambda m, i, o: calls["feature"].append(i[0].shape[0]))
    model.attention[1].register_forward_hook(lambda m, i, o: calls["attention"].append(i[0].shape[0]))

    def run(limit: int):
        monkeypatch.setattr(allocator, "HEAP_BLOCK_BYTES", limit)
        for c in calls.values():
            c.clear()
        model.zero_grad()
        out = model(srcs, generator=torch.Generator().manual_seed(5), contrastive=True)
        (out.logits.logsumexp(1).sum() + out.contrastive_logits.square().sum()).backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole, whole_grads = run(0)
    assert len(calls["feature"]) == 2 and len(calls["attention"]) <= 2  # one call per pass
    assert max(calls["feature"]) > 1
    chunked, chunked_grads = run(1)  # one row a call (and one probe of one row per net and shape)
    assert max(calls["feature"]) == 1 and max(calls["attention"]) == 1
    assert len(calls["feature"]) >= len(whole.leaf_boxes)
    assert torch.equal(whole.leaf_image, chunked.leaf_image) and whole.leaf_boxes == chunked.leaf_boxes
    assert torch.allclose(whole.leaf_features, chunked.leaf_features, atol=1e-6)
    assert torch.allclose(whole.logits, chunked.logits, atol=1e-5)
    assert torch.allclose(whole.contrastive_logits, chunked.contrastive_logits, atol=1e-5)
    assert whole_grads.keys() == chunked_grads.keys()
    for name, grad in whole_grads.items():
        assert torch.allclose(grad, chunked_grads[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("feature", ["lenet", "resnet"])
def test_rows_padded_to_buckets_give_the_values_and_gradients_of_the_rows_alone(monkeypatch, feature):
    """Off the CPU each net's rows are padded to a few counts (1, 2, 3, 4, 6, 8, 12, ...) so
    that a GPU plans few shapes: training and inference give the values and gradients they
    give unpadded (the CPU's rule stood in for a GPU's here)."""
    from zoomnet.model import chunks

    cfg = ModelConfig(levels=[LevelConfig(0.125, (64, 64), "tiled"), LevelConfig(0.5, (16, 16), (4.0, 4.0))],
                      samples=12, feature=feature, num_classes=3, chunk=5)
    srcs = [ArraySource(np.random.default_rng(i).integers(0, 255, (256, 256, 3), dtype=np.uint8)) for i in range(2)]
    torch.manual_seed(0)
    model = ZoomIn(cfg).double().train()
    rows = {"feature": [], "attention": []}
    model.feature.register_forward_hook(lambda m, i, o: rows["feature"].append(i[0].shape[0]))
    model.attention[1].register_forward_hook(lambda m, i, o: rows["attention"].append(i[0].shape[0]))
    buckets = {chunks.bucket(n) for n in range(1, 1000)}

    def run(unpadded: tuple[str, ...]):
        monkeypatch.setattr(chunks, "UNPADDED_DEVICES", unpadded)
        monkeypatch.setattr(chunks, "HEAP_BLOCK_BYTES", 0)
        for r in rows.values():
            r.clear()
        model.zero_grad()
        out = model(srcs, generator=torch.Generator().manual_seed(5), contrastive=True)
        (out.logits.logsumexp(1).sum() + out.contrastive_logits.square().sum()).backward()
        with torch.no_grad():
            pred = model.predict(srcs, generator=torch.Generator().manual_seed(6))
        return out, pred, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, plain_pred, plain_grads = run(("cpu", "meta"))
    assert not set(rows["feature"]) <= buckets  # unpadded, the draws give other counts
    pad, pad_pred, pad_grads = run(("meta",))
    assert set(rows["feature"]) <= buckets and set(rows["attention"]) <= buckets
    assert pad.leaf_boxes == plain.leaf_boxes and pad.leaf_features.shape == plain.leaf_features.shape
    torch.testing.assert_close(pad.leaf_features, plain.leaf_features, rtol=0, atol=1e-10)
    torch.testing.assert_close(pad.logits, plain.logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(pad.contrastive_logits, plain.contrastive_logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(pad_pred.logits, plain_pred.logits, rtol=0, atol=1e-10)
    assert pad_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(pad_grads[name], grad, rtol=1e-9, atol=1e-10, msg=name)


def test_a_net_with_batch_statistics_in_training_is_never_padded(monkeypatch):
    from torch import nn

    from zoomnet.model import chunks

    monkeypatch.setattr(chunks, "UNPADDED_DEVICES", ())
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    x = torch.randn(5, 3, 8, 8)
    seen = []
    net.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    assert chunks.padded(net, net, x).shape[0] == 5 and seen == [5]  # training: BatchNorm's statistics need the rows alone
    net.eval()
    out = chunks.padded(net, net, x)
    assert out.shape[0] == 5 and seen[-1] == 6  # eval: rows are independent, padded to the bucket
    torch.testing.assert_close(out, net(x))


def test_deterministic_and_seeded_predictions_repeat():
    model, src = counting_setup()
    a = model.predict([src], deterministic=True)
    b = model.predict([src], deterministic=True)
    assert torch.equal(a.logits, b.logits)
    c = model.predict([src], generator=torch.Generator().manual_seed(5))
    d = model.predict([src], generator=torch.Generator().manual_seed(5))
    assert torch.equal(c.logits, d.logits)


@pytest.mark.parametrize("strip", [5, 8, 13])
def test_strips_equal_the_whole_view(strip):
    """Level-1 attention in strips with a halo equals the whole-view pass (value and gradient)."""
    torch.manual_seed(0)
    cfg = ModelConfig(levels=[LevelConfig(0.125, (64, 64)), LevelConfig(0.5, (16, 16), (8, 8))], samples=6)
    image = np.random.default_rng(1).integers(0, 255, (256, 320, 3), dtype=np.uint8)
    src = ArraySource(image)
    whole = ZoomIn(cfg)
    striped_cfg = ModelConfig(**{**cfg.__dict__, "strip_rows": strip})
    striped = ZoomIn(striped_cfg)
    striped.load_state_dict(whole.state_dict())
    a = whole([src], generator=torch.Generator().manual_seed(0))
    b = striped([src], generator=torch.Generator().manual_seed(0))
    assert torch.allclose(a.log_maps[0][0], b.log_maps[0][0], atol=1e-5)
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    a.logits.sum().backward()
    b.logits.sum().backward()
    ga = whole.attention[0].net[0].weight.grad
    gb = striped.attention[0].net[0].weight.grad
    assert torch.allclose(ga, gb, atol=1e-5)


@pytest.mark.parametrize("strip", [None, 4])
def test_tissue_mask_keeps_attention_on_tissue(strip):
    """Left half: coloured texture (tissue); right half: white glass. With the mask on, no
    attention mass and no sample falls in glass, in the ordinary or contrastive sample."""
    image = tissue_on_glass(np.random.default_rng(0), 128, 256, 128)
    cfg = ModelConfig(levels=[LevelConfig(0.25, (32, 32)), LevelConfig(0.5, (16, 16), (8, 8))], samples=16,
                      tissue_mask=True, strip_rows=strip, smooth=0.2)
    torch.manual_seed(0)
    model = ZoomIn(cfg)
    out = model([ArraySource(image)], contrastive=True, generator=torch.Generator().manual_seed(0))
    alpha = out.levels[0].maps[0][Box(0, 0, 128, 256)].view(4, 8)
    assert float(alpha[:, 4:].sum()) < 1e-6 and float(alpha[:, :4].sum()) == pytest.approx(1.0, abs=1e-5)
    assert all(s.box.left < 128 for s in out.levels[0].samples[0])
    assert torch.isfinite(out.contrastive_logits).all()
    (out.logits.sum() + out.contrastive_logits.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_contrastive_pass_stays_on_tissue_and_inside_the_image():
    """The complementary sample must keep the restrictions of the ordinary one: no level-1
    tile off the tissue, no level-2 cell centred outside the image or on the glass of a tile
    that straddles the tissue's edge. Every region either pass reads (tile views,
    full-resolution sub-tiles) is checked through the source."""
    # 100 x 200: tissue on the left 100 columns, glass on the right; 64 px tiles stick out below
    image = tissue_on_glass(np.random.default_rng(0), 100, 200, 100)
    cfg = ModelConfig(levels=[LevelConfig(0.25, (64, 64)), LevelConfig(0.5, (16, 16), (8, 8))], samples=24,
                      tissue_mask=True, smooth=0.2)
    for seed in range(4):
        torch.manual_seed(seed)
        model = ZoomIn(cfg)
        src = CountingSource(ArraySource(image, fill=255))
        out = model([src], contrastive=True, generator=torch.Generator().manual_seed(seed))
        assert out.contrastive_logits is not None
        tiles = [b for b, s in src.reads if s is not None and b.height == 64]
        assert tiles and all(b.left < 100 for b in tiles), tiles  # no tile of glass alone
        leaves = src.full_resolution_reads()
        assert leaves
        for b in leaves:  # every sub-tile centred inside the image and on tissue, in either pass
            # (a cell with any tissue pixel may be drawn: its centre is at most half a stride past the edge)
            assert 0 <= b.top + b.height / 2 < 100 and 0 <= b.left + b.width / 2 <= 100 + 4, b


def test_leaf_paths_follow_the_geometry():
    """Each leaf's path names, level by level, the parent it was drawn in and its own cell:
    the cells' boxes, computed from the level's geometry, lead from the whole image to the
    leaf's box."""

    levels = [LevelConfig(0.125, (64, 64)), LevelConfig(0.25, (32, 32), (16, 16)), LevelConfig(0.5, (12, 12), (8, 8))]
    cfg = ModelConfig(levels=levels, samples=9)
    torch.manual_seed(0)
    model = ZoomIn(cfg)
    rng = np.random.default_rng(2)
    sources = [ArraySource(rng.integers(0, 255, (160, 224, 3), dtype=np.uint8)) for _ in range(2)]
    out = model(sources, generator=torch.Generator().manual_seed(0))
    assert len(out.leaf_paths) == len(out.leaf_boxes) > 4
    for path, leaf, b in zip(out.leaf_paths, out.leaf_boxes, out.leaf_image.tolist()):
        assert len(path) == 3
        box = Box(0, 0, 160, 224)
        for level, (image, parent, cell) in enumerate(path):
            assert image == b and parent == box
            lv = levels[level]
            box = Box(*cell_boxes(parent, lv.cell_stride(), lv.region)[cell].tolist())
        assert box == leaf


@pytest.mark.parametrize("chunk", [1, 3, 256])
def test_a_batch_predicts_what_each_image_predicts_alone(chunk):
    """Inference over a batch, in chunks of sub-tiles that span images, gives each image the
    ``z`` and logits it gets alone (deterministic draws do not depend on the batch)."""
    cfg = ModelConfig(levels=[LevelConfig(0.125, (64, 64)), LevelConfig(0.5, (16, 16), (4.0, 4.0))], samples=12,
                      chunk=chunk, view_chunk=2)
    torch.manual_seed(0)
    model = ZoomIn(cfg).double()
    rng = np.random.default_rng(5)
    sources = [ArraySource(rng.integers(0, 255, (192, 256, 3), dtype=np.uint8)) for _ in range(3)]
    batch = model.predict(sources, deterministic=True)
    for i, src in enumerate(sources):
        alone = model.predict([src], deterministic=True)
        torch.testing.assert_close(batch.z[i], alone.z[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(batch.logits[i], alone.logits[0], rtol=0, atol=1e-12)
    assert not torch.allclose(batch.z[0], batch.z[1])  # the images differ, so must their z


def test_cpu_inference_bounds_the_bytes_of_a_levels_views_per_call(monkeypatch):
    """On a CPU a deeper level's views go through its attention net in calls whose widest
    layer output stays under ``VIEW_CHUNK_BYTES`` (large views: fewer per call than
    ``view_chunk``), with the same maps and predictions as in one call."""
    from zoomnet.model import zoomin

    cfg = ModelConfig(levels=[LevelConfig(0.125, (64, 64)), LevelConfig(0.5, (16, 16), (4.0, 4.0))], samples=40,
                      view_chunk=16)
    torch.manual_seed(0)
    model = ZoomIn(cfg).double().eval()
    sources = [ArraySource(np.random.default_rng(1).integers(0, 255, (256, 256, 3), dtype=np.uint8))]
    rows = []
    model.attention[1].register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[0]))
    whole = model.predict(sources, deterministic=True)
    assert max(rows) > 3  # one call took more than three of the 16 parents' 32^2 views
    per_view = 8 * 32 * 32 * 8  # the widest layer: 8 channels of 32^2, float64
    monkeypatch.setattr(zoomin, "VIEW_CHUNK_BYTES", 3 * per_view)
    rows.clear()
    parts = model.predict(sources, deterministic=True)
    assert len(rows) > 1 and max(rows) == 3
    torch.testing.assert_close(parts.logits, whole.logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(parts.z, whole.z, rtol=0, atol=1e-12)


def test_model_never_draws_a_sub_tile_centred_outside_the_image():
    """A 200x150 image under 128 px tiles: the tiles stick out by 56 and 106 px; no drawn
    sub-tile is centred in the fill, and every tile's map is a distribution."""
    from zoomnet.model import LevelConfig, ModelConfig, ZoomIn

    cfg = ModelConfig(levels=[LevelConfig(0.125, (128, 128)), LevelConfig(0.5, (16, 16), "dense")], samples=200,
                      attention_prior=5.0)
    torch.manual_seed(0)
    model = ZoomIn(cfg).eval()
    src = ArraySource(np.random.default_rng(0).integers(0, 255, (200, 150, 3), dtype=np.uint8))
    out = model.predict([src], generator=torch.Generator().manual_seed(0))
    boxes = [s.box for s in out.levels[-1].samples[0]]
    assert len(boxes) > 50
    assert all(0 <= b.top + b.height / 2 < 200 and 0 <= b.left + b.width / 2 < 150 for b in boxes)
    for maps in out.levels[1].maps[0].values():
        assert torch.isfinite(maps).all() and abs(float(maps.sum()) - 1) < 1e-5


def test_tile_views_repeat_the_image_edge_over_the_fill():
    from zoomnet.model.reading import repeat_edges as _repeat_edges

    image = np.random.default_rng(0).integers(0, 255, (200, 150, 3), dtype=np.uint8)
    src = ArraySource(image)
    box = Box(128, 64, 128, 128)  # rows 200-255 and columns 150-191 lie outside
    view = src.read(box, (16, 16))[None]
    out = _repeat_edges(view, [box], 200, 150)[0]
    rows_in = [i for i in range(16) if 128 + (i + 0.5) * 8 < 200]  # view rows centred inside
    cols_in = [j for j in range(16) if 64 + (j + 0.5) * 8 < 150]
    assert len(rows_in) == 9 and len(cols_in) == 11
    assert torch.equal(out[:, :9, :11], view[0, :, :9, :11])  # inside: untouched
    assert torch.equal(out[:, 9:, :11], view[0, :, 8:9, :11].expand(-1, 7, -1))  # below: the last row
    assert torch.equal(out[:, :, 11:], out[:, :, 10:11].expand(-1, -1, 5))  # right: the last column
    assert torch.equal(_repeat_edges(view, [Box(0, 0, 128, 128)], 200, 150), view)  # inside: the view itself


def test_the_tissue_mask_keeps_deeper_levels_off_the_glass_of_a_tile():
    """A tile that straddles the tissue's edge is drawn (it holds tissue); its level-2 cells
    on glass, by the image's own tissue threshold, are not."""
    image = tissue_on_glass(np.random.default_rng(1), 64, 128, 80)
    cfg = ModelConfig(levels=[LevelConfig(0.5, (64, 64)), LevelConfig(0.5, (8, 8), (4, 4))], samples=64,
                      tissue_mask=True, smooth=0.3)
    for seed in range(3):
        torch.manual_seed(seed)
        src = CountingSource(ArraySource(image, fill=255))
        out = ZoomIn(cfg)([src], contrastive=True, generator=torch.Generator().manual_seed(seed))
        assert any(s.box.left == 64 for s in out.levels[0].samples[0])  # the straddling tile is drawn
        leaves = src.full_resolution_reads()
        assert leaves and all(b.left + b.width / 2 <= 80 + 2 for b in leaves), sorted(b.left for b in leaves)


def test_the_mil_baseline_reads_the_tissue_tiles_only_and_trains(data, tmp_path):
    from zoomnet.cli import main
    from zoomnet.model.mil import AttentionMIL

    from helpers import tissue_on_glass

    rng = np.random.default_rng(0)
    image = np.full((256, 256, 3), 245, dtype=np.uint8)
    image[:, :128] = tissue_on_glass(rng, 256, 128, 128)[:, :128]  # tissue on the left half only
    cfg = ModelConfig(kind="mil", levels=[LevelConfig(0.125, (64, 64))], mil_tile=32, mil_scale=0.5)
    model = AttentionMIL(cfg)
    source = ArraySource(image)
    tiles = model.tiles(model.read_views([source])[0], 256, 256)
    assert len(tiles) == 8 * 4 and all(b.left < 128 for b in tiles)  # 8 rows of the 4 tissue columns
    out = model.predict([source])
    assert out.logits.shape == (1, 2) and not out.levels
    run = tmp_path / "mil"
    assert main(["train", "--config", str(data / "tiny.json"), "--train", str(data / "set/train.csv"), "--out", str(run),
                 "--quiet", "--device", "cpu", "--set", "model.kind=mil", "model.mil_tile=32"]) == 0
    assert main(["predict", str(run), str(data / "set/images/tiny_00000.png"), "--quiet"]) == 0


def test_sub_tiles_read_ahead_in_a_thread_give_the_same_prediction(monkeypatch):
    from zoomnet.model import zoomin

    model = ZoomIn(ModelConfig(levels=[LevelConfig(0.125, (64, 64)), LevelConfig(0.5, (16, 16), (8, 8))], samples=12,
                               chunk=3)).eval()
    source = ArraySource(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    outs = []
    for overlap in (False, True):
        monkeypatch.setattr(zoomin, "OVERLAP_READS", overlap)
        assert model.overlap_reads() is overlap
        outs.append(model.predict([source], generator=torch.Generator().manual_seed(0)))
    assert torch.equal(outs[0].logits, outs[1].logits) and outs[0].leaf_boxes == outs[1].leaf_boxes
    assert len(outs[0].leaf_boxes) > 3  # several chunks of three


def test_copies_of_one_image_share_their_parents_maps():
    model = ZoomIn(ModelConfig(levels=[LevelConfig(0.125, (64, 64)), LevelConfig(0.5, (16, 16), (8, 8))],
                               samples=12)).eval()
    pixels = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    source = ArraySource(pixels)
    model.predict([source])  # the CPU's views per call measured once per net and view size (a probe of one row)
    rows = []
    model.attention[1].register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[0]))
    out = model.predict([source] * 6, generator=torch.Generator().manual_seed(0))
    parents = {(b, s.box) for b in range(6) for s in out.levels[0].samples[b]}
    tiles = {box for _, box in parents}
    assert sum(rows) == len(tiles) < len(parents)  # each distinct tile's view run once
    alone = model.predict([ArraySource(pixels.copy()) for _ in range(6)], generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.logits, alone.logits, atol=1e-6)  # the same draws, the same values
