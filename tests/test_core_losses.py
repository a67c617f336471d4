"""zoomnet.core.losses: each loss term on hand-made inputs, batched forms against image-by-image ones."""

from __future__ import annotations

import math

import pytest
import torch
from zoomnet.core import losses
from zoomnet.core.geometry import Box


def test_entropy_regularizer_sums_levels_and_averages_maps():
    uniform4 = torch.full((1, 4), math.log(0.25))
    two_maps = torch.log(torch.tensor([[0.5, 0.5], [1.0, 1e-30]]))
    value = losses.entropy_regularizer([[uniform4, uniform4], [two_maps, two_maps[:1]]])
    # image 0: log 4 + mean(log 2, 0); image 1: log 4 + log 2
    expected = ((math.log(4) + math.log(2) / 2) + (math.log(4) + math.log(2))) / 2
    assert float(value) == pytest.approx(expected, abs=1e-6)


def test_contrastive_loss_only_for_non_reference_images():
    logits = torch.tensor([[0.0, 2.0], [3.0, 0.0]], requires_grad=True)
    labels = torch.tensor([1, 0])
    value = losses.contrastive_loss(logits, labels, reference=0)
    p1 = torch.softmax(logits[0].detach(), 0)[1]
    assert value.item() == pytest.approx(-math.log(1 - float(p1)), abs=1e-6)
    value.backward()
    assert logits.grad[1].abs().sum() == 0  # the reference-class image takes no part
    assert logits.grad[0, 1] > 0  # pushes the true class down for the complementary sample
    assert float(losses.contrastive_loss(logits, torch.tensor([0, 0]), 0).detach()) == 0.0


def test_instance_loss_pushes_reference_bags_down_and_positive_bags_up():
    leaf_logits = torch.zeros(6, 2, requires_grad=True)
    image = torch.tensor([0, 0, 0, 1, 1, 1])
    value = losses.instance_loss(leaf_logits, image, torch.tensor([0, 1]), reference=0)
    assert value.item() == pytest.approx(math.log(2), abs=1e-6)
    value.backward()
    assert (leaf_logits.grad[:3, 1] > 0).all()  # reference bag: every sub-tile away from class 1
    assert (leaf_logits.grad[3:, 1] < 0).all()  # positive bag: towards class 1


def test_mask_loss_prefers_covered_cells():
    cover = torch.tensor([0.0, 1.0, 0.0, 0.0])
    good = torch.log(torch.tensor([0.01, 0.97, 0.01, 0.01]))
    bad = torch.log(torch.tensor([0.97, 0.01, 0.01, 0.01]))
    assert losses.mask_attention_loss([good], [cover]) < losses.mask_attention_loss([bad], [cover])
    assert float(losses.mask_attention_loss([good], [torch.zeros(4)])) == 0.0
    # a cell the map leaves out (outside the image) is no target, however much it covers
    from zoomnet.model.cells import restrict as _restrict

    restricted = _restrict(good[None], torch.tensor([[True, True, True, False]]))[0]
    value = losses.mask_attention_loss([restricted], [torch.tensor([0.0, 1.0, 0.0, 0.5])])
    assert float(value) == pytest.approx(-float(restricted[1]))


def test_distillation_targets_every_cell_on_the_path():
    box, whole = Box(0, 0, 8, 8), Box(0, 0, 16, 16)
    level1 = torch.zeros(4, requires_grad=True)
    level2 = torch.zeros(3, requires_grad=True)
    cell_logits = [{(0, whole): level1}, {(0, box): level2}]
    paths = [((0, whole, 0), (0, box, 2)), ((0, whole, 0), (0, box, 1))]
    value = losses.attention_distillation_loss(cell_logits, paths, torch.tensor([1.0, 0.0]))
    value.backward()
    assert level1.grad[0] < 0  # the tile holds a high-scoring sub-tile: its logit rises
    assert level2.grad[2] < 0 and level2.grad[1] > 0
    assert level1.grad[1:].abs().sum() == 0 and level2.grad[0] == 0


def test_multiclass_instance_loss_needs_no_reference_class():
    # two images of classes 2 and 0, three sub-tiles each, four classes
    leaf_logits = torch.zeros(6, 4, requires_grad=True)
    image = torch.tensor([0, 0, 0, 1, 1, 1])
    labels = torch.tensor([2, 0])
    value = losses.instance_loss(leaf_logits, image, labels, reference=None)
    assert value.item() == pytest.approx(math.log(4), abs=1e-6)  # uniform bags over 4 classes
    value.backward()
    # every sub-tile of a bag shares the push towards the bag's class, away from the others
    assert (leaf_logits.grad[:3, 2] < 0).all() and (leaf_logits.grad[:3, [0, 1, 3]] > 0).all()
    assert (leaf_logits.grad[3:, 0] < 0).all() and (leaf_logits.grad[3:, 1:] > 0).all()


def test_multiclass_instance_loss_pools_towards_the_best_subtile():
    # once one sub-tile stands out for the bag's class, it takes most of the gradient
    leaf_logits = torch.tensor([[0.0, 4.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    losses.instance_loss(leaf_logits, torch.zeros(3, dtype=torch.long), torch.tensor([1]), None).backward()
    assert leaf_logits.grad[0, 1] < 5 * leaf_logits.grad[1, 1] < 0
    # a bag whose best sub-tile shows its class costs less than one whose best shows another
    right = losses.instance_loss(leaf_logits.detach(), torch.zeros(3, dtype=torch.long), torch.tensor([1]), None)
    wrong = losses.instance_loss(leaf_logits.detach(), torch.zeros(3, dtype=torch.long), torch.tensor([2]), None)
    assert right < wrong


def test_leaf_scores_with_and_without_a_reference_class():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    image, labels = torch.tensor([0, 1]), torch.tensor([1, 2])
    assert torch.allclose(losses.leaf_scores(logits, image, labels, 0), torch.tensor([0.3, 0.9]))
    # without one: the one-against-the-rest probability of the image's label, sigmoid(logit)
    expected = torch.sigmoid(torch.stack([logits[0, 1], logits[1, 2]]))
    assert torch.allclose(losses.leaf_scores(logits, image, labels, None), expected)


def test_multiclass_contrastive_loss_takes_every_image():
    logits = torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 0.0]], requires_grad=True)
    value = losses.contrastive_loss(logits, torch.tensor([1, 0]), reference=None)
    value.backward()
    assert logits.grad[0, 1] > 0 and logits.grad[1, 0] > 0  # both true classes pushed down


def _instance_loss_bag_by_bag(leaf_logits, leaf_image, labels, reference, share=None, one_class=False):
    """The instance loss written bag by bag, as its docstring states it."""
    import torch.nn.functional as F

    terms = []
    for b, y in enumerate(labels.tolist()):
        rows = leaf_logits[leaf_image == b]
        if rows.numel() == 0:
            continue
        if reference is None:
            bag = torch.logsumexp(rows[:, y], dim=0) - math.log(rows.shape[0])
            others = torch.cat([rows[:, :y], rows[:, y + 1 :]], dim=1)
            score = torch.sigmoid(rows.detach().max(dim=1).values)  # most like any class
            chosen = (score == score.max()).to(rows.dtype)
            chosen = chosen / chosen.sum()
            which = (chosen * F.cross_entropy(rows, torch.full((rows.shape[0],), y), reduction="none")).sum()
            terms.append(F.softplus(-bag) + F.softplus(others).mean() + one_class * which * (score.max() - score.mean()))
        elif y == reference:
            weight = 1.0 if share is None else 0.5 / share
            terms.append(weight * F.cross_entropy(rows, torch.full((rows.shape[0],), y)))
        else:
            weight = 1.0 if share is None else 0.5 / (1 - share)
            others = torch.cat([rows[:, :y], rows[:, y + 1 :]], dim=1)
            margin = rows[:, y] - torch.logsumexp(others, dim=1)
            objects = torch.cat([rows[:, :reference], rows[:, reference + 1 :]], dim=1)
            objectness = (torch.logsumexp(objects, dim=1) - rows[:, reference]).detach()
            score = torch.sigmoid(objectness)
            chosen = (score == score.max()).to(rows.dtype)
            chosen = chosen / chosen.sum()
            which = (chosen * (torch.logsumexp(objects, dim=1) - rows[:, y])).sum() * (score.max() - score.mean())
            terms.append(weight * (F.softplus(-(torch.logsumexp(margin, dim=0) - math.log(margin.numel()))) + which))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("reference, one_class", [(None, False), (None, True), (0, False)])
def test_instance_loss_of_all_bags_at_once_equals_bag_by_bag(reference, one_class):
    g = torch.Generator().manual_seed(0)
    leaf_logits = (torch.randn(23, 4, generator=g, dtype=torch.float64) * 3).requires_grad_()
    image = torch.tensor([0] * 5 + [1] * 1 + [3] * 9 + [4] * 8)  # image 2 has no sub-tile
    labels = torch.tensor([1, 0, 2, 3, 0])
    a = losses.instance_loss(leaf_logits, image, labels, reference, one_class_per_image=one_class)
    (ga,) = torch.autograd.grad(a, leaf_logits)
    b = _instance_loss_bag_by_bag(leaf_logits, image, labels, reference, one_class=one_class)
    (gb,) = torch.autograd.grad(b, leaf_logits)
    assert torch.allclose(a, b) and torch.allclose(ga, gb)
    assert torch.isfinite(ga).all()


@pytest.mark.parametrize("share", [0.25, 0.5, 0.8])
def test_instance_loss_weighs_reference_and_object_bags_to_halves(share):
    """With the reference class's share of the training set, reference bags weigh 0.5 / share
    and the others 0.5 / (1 - share): a balanced set (0.5) is the unweighted loss."""
    g = torch.Generator().manual_seed(1)
    leaf_logits = (torch.randn(23, 4, generator=g, dtype=torch.float64) * 3).requires_grad_()
    image = torch.tensor([0] * 5 + [1] * 1 + [3] * 9 + [4] * 8)
    labels = torch.tensor([1, 0, 2, 3, 0])
    a = losses.instance_loss(leaf_logits, image, labels, 0, reference_share=share)
    (ga,) = torch.autograd.grad(a, leaf_logits)
    b = _instance_loss_bag_by_bag(leaf_logits, image, labels, 0, share)
    (gb,) = torch.autograd.grad(b, leaf_logits)
    assert torch.allclose(a, b) and torch.allclose(ga, gb)
    plain = losses.instance_loss(leaf_logits, image, labels, 0)
    assert torch.allclose(a, plain) == (share == 0.5)


def test_balanced_instance_loss_keeps_background_below_half_when_objects_outnumber_reference():
    """Three object bags to one reference bag, each holding the same background sub-tile
    (and no object). Unweighted, the loss is lowest where the background is called an
    object with p = 0.75 (every object logit equal to the reference's: the three object
    bags outvote the one reference bag); weighted to halves, at p = 0.5 (each object logit
    at log 1/3), where an object sub-tile's score rises above it."""
    import torch.nn.functional as F

    labels = torch.tensor([1, 2, 3, 0])  # class 0: the reference ("no sign")
    image = torch.arange(4)
    best = {}
    for share in (None, 0.25):
        margin = torch.linspace(-6, 6, 1201)
        values = []
        for m in margin:  # the one background logit row: reference 0, every object class m
            logits = torch.tensor([[0.0, m, m, m]]).repeat(4, 1)
            values.append(float(losses.instance_loss(logits, image, labels, 0, reference_share=share)))
        m = margin[int(torch.tensor(values).argmin())]
        best[share] = float(1 - F.softmax(torch.tensor([0.0, m, m, m]), 0)[0])  # p(not reference)
    assert abs(best[None] - 0.75) < 0.01 and abs(best[0.25] - 0.5) < 0.01, best


def test_entropy_regularizer_skips_images_without_maps_at_a_level():
    uniform4 = torch.full((1, 4), math.log(0.25), requires_grad=True)
    two_maps = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]])).requires_grad_()
    value = losses.entropy_regularizer([[uniform4, uniform4], [two_maps, torch.zeros(0, 1)]])
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    expected = ((math.log(4) + (math.log(2) + h) / 2) + math.log(4)) / 2
    assert float(value.detach()) == pytest.approx(expected, abs=1e-6)
    value.backward()
    assert torch.isfinite(two_maps.grad).all() and two_maps.grad.abs().sum() > 0


def test_instance_loss_gives_the_object_like_subtile_its_image_class():
    """Classes: 0 the reference, 1 and 2 objects. A bag of class 2 whose first sub-tile is
    object-like (reference logit -3) and whose other three are background (reference logit
    +3): the push between the object classes falls on the first sub-tile alone."""
    leaf_logits = torch.tensor([[-3.0, 0.0, 0.0]] + [[3.0, 0.0, 0.0]] * 3, requires_grad=True)
    image, labels = torch.zeros(4, dtype=torch.long), torch.tensor([2])
    losses.instance_loss(leaf_logits, image, labels, reference=0).backward()
    between = leaf_logits.grad[:, 2] - leaf_logits.grad[:, 1]  # d loss / d (logit 2 - logit 1)
    margin_only = leaf_logits.detach().requires_grad_()
    m = margin_only[:, 2] - torch.logsumexp(margin_only[:, :2], dim=1)
    torch.nn.functional.softplus(-(torch.logsumexp(m, 0) - math.log(4))).backward()
    part = between - (margin_only.grad[:, 2] - margin_only.grad[:, 1])  # the object-class part alone
    assert part[0] < -0.5 and torch.allclose(part[1:], torch.zeros(3), atol=1e-7), part
    # while every sub-tile looks alike, the part is silent: the loss is the pooled margin alone
    alike = torch.tensor([[3.0, 0.0, 0.5]] * 4)
    margin = alike[:, 2] - torch.logsumexp(alike[:, :2], dim=1)
    expected = torch.nn.functional.softplus(-(torch.logsumexp(margin, 0) - math.log(4)))
    assert torch.allclose(losses.instance_loss(alike, image, labels, reference=0), expected)
    # with one object class the part vanishes: the binary loss is the pooled margin alone
    two = torch.tensor([[-3.0, 0.0]] + [[3.0, 0.0]] * 3)
    margin = two[:, 1] - two[:, 0]
    expected = torch.nn.functional.softplus(-(torch.logsumexp(margin, 0) - math.log(4)))
    assert torch.allclose(losses.instance_loss(two, image, torch.tensor([1]), reference=0), expected)


def test_multiclass_instance_loss_gives_the_subtile_most_like_any_class_its_image_class():
    """No reference class, three classes. A bag of class 2 whose first sub-tile is called
    class 1 with confidence and whose other three are background (every logit -3): the
    cross-entropy towards class 2 falls on the first sub-tile alone, and is silent while
    every sub-tile looks alike (with ``one_class_per_image``; without it, the part is off)."""
    import torch.nn.functional as F

    leaf_logits = torch.tensor([[0.0, 3.0, 0.0]] + [[-3.0, -3.0, -3.0]] * 3, requires_grad=True)
    image, labels = torch.zeros(4, dtype=torch.long), torch.tensor([2])
    losses.instance_loss(leaf_logits, image, labels, reference=None, one_class_per_image=True).backward()
    pooled = leaf_logits.detach().requires_grad_()
    bag = torch.logsumexp(pooled[:, 2], 0) - math.log(4)
    (F.softplus(-bag) + F.softplus(pooled[:, :2]).sum(1).mean() / 2).backward()  # without the part
    part = leaf_logits.grad - pooled.grad
    weight = torch.sigmoid(torch.tensor(3.0)) - (torch.sigmoid(torch.tensor(3.0)) + 3 * torch.sigmoid(torch.tensor(-3.0))) / 4
    expected = (torch.softmax(torch.tensor([0.0, 3.0, 0.0]), 0) - F.one_hot(torch.tensor(2), 3)) * weight
    assert torch.allclose(part[0], expected, atol=1e-6) and part[1:].abs().max() < 1e-7, part
    alike = torch.tensor([[0.0, 3.0, 0.0]] * 4)
    bag = torch.logsumexp(alike[:, 2], 0) - math.log(4)
    expected_value = F.softplus(-bag) + F.softplus(alike[:, :2]).sum(1).mean() / 2
    assert torch.allclose(losses.instance_loss(alike, image, labels, None, one_class_per_image=True), expected_value)
    # off (the default): the loss is the pooled term and the negatives alone
    bag = torch.logsumexp(leaf_logits.detach()[:, 2], 0) - math.log(4)
    plain = F.softplus(-bag) + F.softplus(leaf_logits.detach()[:, :2]).sum(1).mean() / 2
    assert torch.allclose(losses.instance_loss(leaf_logits.detach(), image, labels, reference=None), plain)


def test_contrastive_loss_is_the_mean_over_images():
    """Over several images, the term is the mean of each image's ``-log(1 - p_y)`` (images of
    the reference class left out), not their sum."""
    torch.manual_seed(0)
    logits = torch.randn(5, 3)
    labels = torch.tensor([1, 0, 2, 1, 2])
    each = [float(losses.contrastive_loss(logits[i : i + 1], labels[i : i + 1], 0)) for i in range(5) if labels[i] != 0]
    assert float(losses.contrastive_loss(logits, labels, 0)) == pytest.approx(sum(each) / len(each), rel=1e-6)
    every = [float(losses.contrastive_loss(logits[i : i + 1], labels[i : i + 1], None)) for i in range(5)]
    assert float(losses.contrastive_loss(logits, labels, None)) == pytest.approx(sum(every) / 5, rel=1e-6)


def test_mask_loss_normalises_the_coverage():
    """The target of each map is its coverage divided by its total (coverage fractions of
    cells do not sum to 1): the cross-entropy with the normalised coverage, averaged over maps."""
    torch.manual_seed(0)
    maps = [torch.log_softmax(torch.randn(6), 0), torch.log_softmax(torch.randn(4), 0), torch.log_softmax(torch.randn(6), 0)]
    covers = [torch.tensor([0.0, 0.5, 0.25, 0.0, 0.0, 1.0]), torch.zeros(4), torch.tensor([0.1, 0.0, 0.0, 0.0, 0.0, 0.1])]
    want = [-(c / c.sum() * lp).sum() for lp, c in zip(maps, covers) if c.sum() > 0]  # maps with objects only
    got = losses.mask_attention_loss(maps, covers)
    assert float(got) == pytest.approx(float(sum(want) / len(want)), rel=1e-6)


@pytest.mark.parametrize("same_size", [True, False])
def test_entropy_regulariser_is_a_batch_mean_of_per_level_mean_entropies(same_size):
    """Per image: the sum over levels of the mean entropy of that level's maps; then the mean
    over images, whether the maps of a level share a size or not (images of other sizes)."""
    torch.manual_seed(0)
    sizes = [4, 4, 4] if same_size else [4, 9, 6]
    level1 = [torch.log_softmax(torch.randn(1, g), 1) for g in sizes]
    level2 = [torch.log_softmax(torch.randn(m, g), 1) for m, g in zip([2, 3, 1], [5, 5, 5] if same_size else [5, 7, 5])]

    def mean_entropy(lp):
        return float((-(lp.exp() * lp).sum(1)).mean())

    want = sum(mean_entropy(a) + mean_entropy(b) for a, b in zip(level1, level2)) / 3
    assert float(losses.entropy_regularizer([level1, level2])) == pytest.approx(want, rel=1e-6)
