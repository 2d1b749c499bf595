"""Uncertainty map and ranked slices (napari_unet.engine.uncertainty)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_unet.engine.predict import predict_probabilities
from napari_unet.engine.uncertainty import (
    STRATEGIES,
    background_level,
    coverage_width,
    default_edge,
    default_min_gap,
    entropy,
    rank_slices,
    slice_scores,
    suggest,
    uncertainty_map,
)
from napari_unet.model.checkpoint import SegmentationModel
from napari_unet.model.config import UNetConfig
from napari_unet.model.unet import UNet
from napari_unet.progress import drain

from ..conftest import tiny_model


def threshold_model(gain: float = 12.0, level: float = 0.5) -> SegmentationModel:
    """A toy 2D model whose foreground probability is ``sigmoid(gain * (x - level))``: sure of
    bright and dark pixels, unsure near ``level``."""
    network = UNet(UNetConfig(spatial_dims=2, base_channels=1, depth=1))
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.Conv2d) and module.kernel_size == (3, 3):
                module.weight.zero_()
                module.weight[0, 0, 1, 1] = 1.0
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.zero_()
                module.running_var.fill_(1 - module.eps)
                module.weight.fill_(1.0)
                module.bias.zero_()
        network.head.weight.fill_(gain)
        network.head.bias.fill_(-gain * level)
    network.eval()
    return SegmentationModel(network=network, task="foreground", name="threshold",
                             normalization={"mode": "none"})


def discs(contrasts, size: int = 48, seed: int = 0, noise: float = 0.12):
    """Discs on a dark background, one slice per contrast: the lower the contrast, the more
    the threshold model gets wrong."""
    rng = np.random.default_rng(seed)
    yy, xx = np.indices((size, size))
    n = len(contrasts)
    truth = np.zeros((n, size, size), bool)
    image = np.zeros((n, size, size), np.float32)
    for z, contrast in enumerate(contrasts):
        for _ in range(3):
            cy, cx = rng.uniform(10, size - 10, 2)
            truth[z] |= (yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(16, 40)
        image[z] = 0.5 + contrast * (truth[z] - 0.5) + rng.normal(0, noise, (size, size))
    return image, truth


def hard_and_easy_stack(hard: tuple[int, ...], n: int = 12, size: int = 48, seed: int = 0):
    """The ``hard`` slices have low contrast (the model is wrong there), the others high."""
    return discs([0.12 if z in hard else 1.0 for z in range(n)], size, seed)


def test_entropy_is_normalised_binary_and_softmax():
    p = np.array([[0.0, 0.5, 1.0, 0.1]], np.float32)
    h = entropy(p, "foreground")
    assert h[1] == pytest.approx(1.0) and h[0] < 1e-4 and h[2] < 1e-4
    assert h[3] == pytest.approx(-(0.1 * np.log2(0.1) + 0.9 * np.log2(0.9)), abs=1e-5)
    two = np.array([[0.5, 0.0], [0.0, 0.0]], np.float32)  # foreground_boundary channels
    assert entropy(two, "foreground_boundary", reduce="max")[0] == pytest.approx(1.0)
    assert entropy(two, "foreground_boundary", reduce="mean")[0] == pytest.approx(0.5, abs=1e-4)
    uniform = np.full((4, 3), 0.25, np.float32)
    sure = np.array([[1.0], [0.0], [0.0], [0.0]], np.float32)
    assert entropy(uniform, "semantic") == pytest.approx(np.ones(3), abs=1e-5)
    assert entropy(sure, "semantic")[0] < 1e-4
    as_bytes = np.array([[0, 128, 255]], np.uint8)  # 0..255 probabilities
    assert entropy(as_bytes, "foreground")[1] == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ValueError, match="reduce"):
        entropy(p, reduce="median")


def test_uncertainty_map_takes_the_larger_of_entropy_and_disagreement():
    probs = np.array([[[0.5, 0.99, 0.99]]], np.float32)  # (C, Y, X)
    spread = np.array([[0.0, 0.0, 0.3]], np.float32)
    u = uncertainty_map(probs, "foreground", spread)
    assert u[0, 0] == pytest.approx(1.0)  # a coin flip
    assert u[0, 1] < 0.1  # sure, and the augmentations agree
    assert u[0, 2] == pytest.approx(0.6)  # sure on average, but they disagree
    assert uncertainty_map(probs, "foreground")[0, 2] < 0.1
    with pytest.raises(ValueError, match="spread"):
        uncertainty_map(probs, "foreground", np.zeros((2, 2)))


def test_score_is_high_where_the_model_is_wrong_and_low_where_it_is_confident():
    hard = (2, 7, 9)
    image, truth = hard_and_easy_stack(hard)
    model = threshold_model()
    probs = drain(predict_probabilities(image, model, device="cpu", precision="fp32", dtype=np.float32))
    errors = ((probs[0] > 0.5) != truth).mean(axis=(1, 2))
    assert errors[list(hard)].min() > 5 * errors[[z for z in range(12) if z not in hard]].max()
    u = uncertainty_map(probs, "foreground")
    scores = slice_scores(u, probs)
    easy = [z for z in range(12) if z not in hard]
    assert scores[list(hard)].min() > 3 * scores[easy].max()
    ranked = rank_slices(u, probs, 3, strategy="top")  # the scores alone
    assert sorted(z for z, _ in ranked) == sorted(hard)
    # with graded difficulty, the scores follow the errors slice by slice (rank correlation)
    contrasts = np.random.default_rng(1).permutation(np.linspace(0.1, 0.6, 10))
    image, truth = discs(contrasts, seed=2)
    probs = drain(predict_probabilities(image, model, device="cpu", precision="fp32", dtype=np.float32))
    errors = ((probs[0] > 0.5) != truth).mean(axis=(1, 2))
    scores = slice_scores(uncertainty_map(probs, "foreground"), probs)
    order = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    assert np.corrcoef(order(scores), order(errors))[0, 1] > 0.8


def test_the_region_ignores_faint_background_noise():
    # a slice of faint, even background doubt scores below a slice with one doubtful object
    u = np.zeros((2, 40, 40), np.float32)
    probs = np.zeros((1, 2, 40, 40), np.float32)
    u[0] = 0.2  # background everywhere slightly unsure (p ~ 0.03), no object
    probs[0, 0] = 0.03
    u[1, 10:20, 10:20] = 0.9  # one object, unsure
    probs[0, 1, 10:20, 10:20] = 0.6
    scores = slice_scores(u, probs)
    assert scores[1] > scores[0] == 0.0


def test_only_the_doubt_above_the_soft_background_counts():
    # a briefly trained model is soft: its background is 0.5 bits uncertain everywhere
    u = np.full((2, 40, 40), 0.55, np.float32)
    probs = np.full((1, 2, 40, 40), 0.12, np.float32)
    u[1] = 0.5
    u[1, 10:20, 10:20] = 0.95  # one doubtful object
    probs[0, 1, 10:20, 10:20] = 0.6
    assert background_level(u, probs) == pytest.approx(0.55)
    scores = slice_scores(u, probs)
    assert scores[0] == 0.0 and scores[1] > 0.05
    # measured without the level, the brighter background would have won
    assert (u[0] * (u[0] >= 0.5)).mean() > (u[1] * (u[1] >= 0.5)).mean()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_3d_model_gets_the_stack_ends_suggested_last(strategy):
    u = np.zeros((20, 8, 8), np.float32)
    for z, value in {0: 0.99, 1: 0.98, 19: 0.97, 8: 0.8, 14: 0.7}.items():
        u[z] = value
    assert [z for z, _ in rank_slices(u, None, 2, min_gap=1, strategy="top")] == [0, 1]
    assert [z for z, _ in rank_slices(u, None, 2, min_gap=1, edge=2, strategy=strategy)] == [8, 14]
    # the ends are still taken when nothing else is left
    short = u[[0, 1, 8, 14, 4, 19]]
    assert [z for z, _ in rank_slices(short, None, 4, min_gap=1, edge=2, strategy=strategy)] == [2, 3, 0, 1]
    assert default_edge(30, 3) == 2 and default_edge(4, 5) == 0


def test_ranking_order_spacing_and_exclusion():
    u = np.zeros((20, 8, 8), np.float32)
    for z, value in {3: 0.95, 4: 0.9, 5: 0.85, 12: 0.7, 17: 0.6}.items():
        u[z] = value
    # best first, neighbours of a chosen slice skipped
    assert [z for z, _ in rank_slices(u, None, 3, min_gap=3, strategy="top")] == [3, 12, 17]
    assert [z for z, _ in rank_slices(u, None, 3, min_gap=1, strategy="top")] == [3, 4, 5]
    ranked = rank_slices(u, None, 3, min_gap=3, exclude=[3], strategy="top")
    assert [z for z, _ in ranked] == [4, 12, 17]
    scores = [s for _, s in ranked]
    assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(0.9)
    # too far apart for n slices: the best of the rest fill up
    assert len(rank_slices(u, None, 6, min_gap=15)) == 6
    assert len(rank_slices(u, None, 50)) == 20
    assert default_min_gap(30, 3) == 5 and default_min_gap(4, 5) == 1
    assert rank_slices(u[0], None, 2) == [(0, 0.0)]  # a 2D image is one slice
    with pytest.raises(ValueError):
        rank_slices(u, None, 0)
    with pytest.raises(ValueError, match="strategy"):
        rank_slices(u, None, 2, strategy="best")


def stack_of(values) -> np.ndarray:
    """An uncertainty map whose slice scores are ``values`` (no probabilities: the region is
    the doubtful voxels, and the background level is 0 with a zero border)."""
    u = np.zeros((len(values), 10, 10), np.float32)
    for z, value in enumerate(values):
        u[z, 3:7, 3:7] = value
    return u


def picks(u, n, **kwargs) -> list[int]:
    return sorted(z for z, _ in rank_slices(u, None, n, **kwargs))


def test_every_strategy_keeps_its_slices_apart_and_lists_the_best_first():
    rng = np.random.default_rng(3)
    u = stack_of(rng.uniform(0.5, 1.0, 40))
    scores = slice_scores(u)
    for strategy in STRATEGIES:
        for n in (2, 3, 5):
            ranked = rank_slices(u, None, n, strategy=strategy, exclude=[20])
            chosen = [z for z, _ in ranked]
            assert len(set(chosen)) == n and 20 not in chosen
            assert np.diff(sorted(chosen)).min() >= default_min_gap(40, n), (strategy, n, chosen)
            if strategy != "top":  # "top" only never suggests them
                assert min(abs(z - 20) for z in chosen) >= default_min_gap(40, n)
            assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)
            assert [s for _, s in ranked] == pytest.approx(scores[chosen])


def test_coverage_spreads_even_doubt_evenly_and_follows_uneven_doubt():
    assert coverage_width(30, 3) == 5 and coverage_width(4, 5) == 1
    even = picks(stack_of(np.ones(30)), 3)
    assert np.abs(np.array(even) - [5, 15, 25]).max() <= 1  # like evenly spaced slices
    # doubt in the top half: more slices there, and not all of them onto the top
    top_doubt = stack_of(np.r_[np.ones(20), np.full(20, 0.6)])
    coverage = picks(top_doubt, 4)
    assert sum(z < 20 for z in coverage) >= 2 and sum(z >= 20 for z in coverage) >= 1
    assert picks(top_doubt, 4, strategy="top") == [0, 5, 10, 15]  # what it avoids
    assert min(coverage) >= 2  # a pick at the very end would reach only half its neighbours
    # a corrected slice counts as reached: the picks go where it does not reach
    assert 13 <= picks(stack_of(np.ones(30)), 1)[0] <= 16
    far = picks(stack_of(np.ones(30)), 2, exclude=[15])
    assert all(abs(z - 15) >= 8 for z in far) and far[0] < 15 < far[1]


def test_stratified_takes_the_most_uncertain_slice_of_each_block():
    def spiky(peaks):
        values = np.full(30, 0.55)
        for z, value in peaks.items():
            values[z] = value
        return stack_of(values)

    u = spiky({1: 0.96, 8: 0.95, 14: 0.6, 25: 0.58})
    assert picks(u, 3, strategy="stratified") == [1, 14, 25]  # blocks 0-9, 10-19, 20-29
    assert picks(u, 3, strategy="top") == [1, 8, 14]  # two in the first block
    # blocks are served best first: block 1's 10 wins the clash with block 0's 8 (min_gap 5)
    assert picks(spiky({8: 0.9, 2: 0.7, 10: 0.99, 25: 0.8}), 3, strategy="stratified") == [2, 10, 25]


@pytest.mark.parametrize("dims", [2, 3])
def test_suggest_segments_and_ranks_with_and_without_tta(dims):
    image, _ = hard_and_easy_stack((1, 5), n=8, size=32)
    model = threshold_model() if dims == 2 else tiny_model(3, depth=2, base=2)
    plain = drain(suggest(image, model, 2, device="cpu", precision="fp32"))
    assert len(plain.slices) == 2 and plain.uncertainty.shape == image.shape
    assert plain.result.data.shape == image.shape
    edge = default_edge(8, 2) if dims == 3 else 0  # a 3D model: the ends last
    expected = rank_slices(uncertainty_map(plain.result.probabilities, model.task),
                           plain.result.probabilities, 2, edge=edge)
    assert [z for z, _ in plain.slices] == [z for z, _ in expected]
    augmented = drain(suggest(image, model, 2, tta=True, device="cpu", precision="fp32"))
    assert len(augmented.slices) == 2
    # with TTA the disagreement is part of the map: never below the entropy alone
    alone = uncertainty_map(augmented.result.probabilities, model.task)
    assert np.all(augmented.uncertainty >= alone - 1e-6)
    if dims == 2:
        assert sorted(z for z, _ in plain.slices) == [1, 5]
    with pytest.raises(ValueError, match="3D stack"):
        drain(suggest(image[0], threshold_model(), 2, device="cpu"))
