"""The live loss curve's numbers: relative losses, Dice points, axes that only grow."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from napari_unet.training.loss_curve import LossCurve


def _stats(iteration, loss, elapsed=0.0, dice=None):
    return SimpleNamespace(iteration=iteration, loss=loss, elapsed=elapsed, validation_dice=dice)


def test_axes_from_the_plan():
    curve = LossCurve()
    assert curve.axes == (True, 60.0, 1.0)
    curve.reset(time_limit=100.0)
    assert curve.axes == (True, pytest.approx(115.0), 1.25)
    curve.reset(iterations=40)
    assert curve.axes == (False, pytest.approx(46.0), 1.25)
    curve.reset(time_limit=10.0, iterations=40)  # a time limit wins
    assert curve.by_time and curve.x_max == pytest.approx(11.5)
    curve.reset()
    assert curve.by_time and curve.x_max == pytest.approx(69.0)


def test_points_relative_to_the_first_loss():
    curve = LossCurve()
    curve.reset(iterations=10)
    curve.add(_stats(1, float("nan")))  # left out, but the curve has news
    assert curve.x == [] and curve.taken() and not curve.taken()
    curve.add(_stats(2, 2.0))
    curve.add(_stats(3, 1.0, dice=0.5))
    assert curve.x == [2, 3] and curve.losses == [1.0, 0.5] and curve.first_loss == 2.0
    assert curve.dice_x == [3] and curve.dice == [0.5]
    curve.reset(iterations=10)
    assert curve.x == [] and curve.first_loss is None and not curve.dirty


def test_axes_grow_past_the_points():
    curve = LossCurve()
    curve.reset(time_limit=10.0)
    curve.add(_stats(1, 1.0, elapsed=1.0))
    assert not curve.grow_y() and not curve.grow_x()
    curve.add(_stats(2, 3.0, elapsed=20.0))
    assert curve.grow_y() and curve.y_max == pytest.approx(3.6)
    assert curve.grow_x() and curve.x_max == 40.0
    assert not curve.grow_y() and not curve.grow_x()
