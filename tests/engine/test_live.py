"""A segmentation run as the GUI does it: options, names, previews and uncertainty in the worker."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from napari_unet.engine.live import (
    SUGGESTED_SLICES,
    PredictOptions,
    RunExtras,
    UncertaintyRequest,
    default_output,
    labels_name,
    uncertainty_extras,
    uncertainty_name,
    uncertainty_request,
    with_previews,
)
from napari_unet.engine.predict import SegmentationResult, segment
from napari_unet.engine.uncertainty import default_edge, rank_slices, uncertainty_map
from napari_unet.labels.instances import to_semantic
from napari_unet.progress import Progress, drain

from ..conftest import tiny_model


def test_options_and_names():
    assert PredictOptions().kwargs() == {}
    assert PredictOptions(batch_size=1).kwargs() == {"batch_size": 1}
    assert PredictOptions((16, 16), 2).kwargs() == {"tile_shape": (16, 16), "batch_size": 2}
    assert labels_name("cells") == "cells labels" and uncertainty_name("cells") == "cells uncertainty"


@pytest.mark.parametrize("task, name, expected", [
    ("foreground_boundary", "x", "instances"), ("foreground", "nuclei-2d", "instances"),
    ("foreground", "cells-3d", "instances"), ("membranes", "em-membranes-2d", "labels"),
    ("semantic", "organs", "labels"),
])
def test_default_output(task, name, expected):
    assert default_output(SimpleNamespace(task=task, name=name)) == expected


def _model(spatial_dims, in_channels=1):
    return SimpleNamespace(spatial_dims=spatial_dims,
                           config=SimpleNamespace(in_channels=in_channels))


def test_uncertainty_request():
    # a 2D image, no map asked: nothing to compute
    assert uncertainty_request((40, 40), _model(2), show=False, whole=True, tta=False) is None
    # part of a stack, no map asked: nothing either (slices are ranked on whole stacks only)
    assert uncertainty_request((8, 40, 40), _model(2), show=False, whole=False, tta=False) is None
    ranked = uncertainty_request((8, 40, 40), _model(2), show=False, whole=True, tta=False)
    assert ranked == UncertaintyRequest(show=False, rank=True, edge=0)
    edge = uncertainty_request((60, 40, 40), _model(3), show=True, whole=True, tta=True,
                               input_shape=(60, 40, 40))
    assert edge.show and edge.rank and edge.edge == default_edge(60, SUGGESTED_SLICES)
    assert edge.spread.shape == (60, 40, 40) and edge.spread.dtype == np.float16
    channels = uncertainty_request((40, 40), _model(2, 2), show=True, whole=True, tta=True,
                                   input_shape=(2, 40, 40))
    assert not channels.rank and channels.spread.shape == (40, 40)


def test_previews_and_outcome_match_the_core():
    image = np.random.default_rng(0).normal(size=(6, 32, 32)).astype(np.float32)
    model = tiny_model(2)
    previews = []

    def on(item):
        update, preview = item
        if preview is not None:
            expected = to_semantic(np.asarray(update.probabilities, np.float32), model.task,
                                   threshold=0.4)
            np.testing.assert_array_equal(preview, expected)
            previews.append(update.region)

    request = UncertaintyRequest(show=True, rank=True, exclude=[0])
    outcome = drain(with_previews(segment(image, model, output="instances", threshold=0.4),
                                  model.task, 0.4, request), on)
    assert previews
    expected = drain(segment(image, model, output="instances", threshold=0.4))
    np.testing.assert_array_equal(outcome.result.data, expected.data)
    ids = np.unique(expected.data)
    assert outcome.n_found == np.count_nonzero(ids) and outcome.largest == int(ids[-1])
    plain = uncertainty_map(expected.probabilities, model.task)
    np.testing.assert_allclose(outcome.extras.uncertainty, plain, atol=1e-6)
    assert outcome.extras.suggested == rank_slices(plain, expected.probabilities,
                                                   SUGGESTED_SLICES, task=model.task,
                                                   threshold=0.4, exclude=[0])
    assert 0 not in [z for z, _ in outcome.extras.suggested]


def test_no_request_no_extras_and_probabilities_count_nothing():
    result = SegmentationResult(data=np.zeros((4, 4), np.float32), output="probabilities",
                                probabilities=np.zeros((1, 4, 4), np.float32), task="foreground")
    assert uncertainty_extras(result, "foreground", 0.5, None) == RunExtras()
    only_map = uncertainty_extras(result, "foreground", 0.5, UncertaintyRequest(show=True))
    assert only_map.uncertainty is not None and only_map.suggested is None

    def job():
        yield Progress(done=0, total=1, elapsed=0.0, stage="plan", message="1 tile")
        return result

    outcome = drain(with_previews(job(), "foreground", 0.5))
    assert (outcome.n_found, outcome.largest) == (0, 0) and outcome.extras == RunExtras()


def test_closing_the_previews_closes_the_job():
    closed = []

    def job():
        try:
            for i in range(10):
                yield Progress(done=i, total=10, elapsed=0.0)
        finally:
            closed.append(True)

    previews = with_previews(job(), "foreground", 0.5)
    update, preview = next(previews)
    assert update.done == 0 and preview is None
    previews.close()
    assert closed == [True]
