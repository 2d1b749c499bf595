"""Normalisation of odd images (issue 14): NaN / infinite voxels, bool, all-NaN."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from napari_unet.engine.predict import predict_probabilities
from napari_unet.model.normalization import (
    NonFiniteValuesWarning,
    Normalizer,
    UnusableImageError,
    count_nonfinite,
    fit_normalizer,
)
from napari_unet.progress import drain

from ..conftest import tiny_model

RNG = np.random.default_rng(0)


def test_percentiles_ignore_nan_and_say_how_many():
    image = RNG.random((40, 50)).astype(np.float32) * 100
    clean = fit_normalizer(image, None)
    broken = image.copy()
    broken[3, 4] = np.nan
    broken[7, 8] = np.inf
    with pytest.warns(NonFiniteValuesWarning, match=r"^2 of 2000 voxels are NaN or infinite; treated as background$"):
        fitted = fit_normalizer(broken, None)
    assert np.isfinite(fitted.offset) and np.isfinite(fitted.scale)
    assert fitted.offset == pytest.approx(clean.offset, rel=0.05)
    assert fitted.scale == pytest.approx(clean.scale, rel=0.05)


def test_subsampled_image_reports_a_fraction(monkeypatch):
    import napari_unet.model.normalization as normalization

    monkeypatch.setattr(normalization, "_PERCENTILE_SAMPLE", 100)
    image = RNG.random((40, 40)).astype(np.float32)
    image[RNG.random(image.shape) < 0.3] = np.nan
    with pytest.warns(NonFiniteValuesWarning, match=r"^about \d+\.\d\d% of the voxels are NaN or infinite"):
        fit_normalizer(image, None)


def test_non_finite_voxels_become_background_in_every_mode():
    data = np.array([np.nan, np.inf, -np.inf, 40.0, 240.0], np.float32)
    for normalizer in (Normalizer(10.0, 0.5), Normalizer(-160.0, 1 / 400, clip=(-160.0, 240.0)),
                       Normalizer(0.0, 1.0)):
        out = normalizer(data)
        assert np.isfinite(out).all()
        np.testing.assert_array_equal(out[:3], 0.0)  # not the window's top (inf clipped to 1)
        np.testing.assert_allclose(out[3:], (np.clip(data[3:], *(normalizer.clip or (-1e9, 1e9)))
                                             - normalizer.offset) * normalizer.scale)
    assert not np.isnan(data[3:]).any()  # input unchanged
    assert np.isnan(data[0])


def test_all_nan_image_is_refused():
    with pytest.raises(UnusableImageError, match="no finite values"):
        fit_normalizer(np.full((8, 8), np.nan, np.float32), None)


def test_bool_image_is_normalised_as_0_1():
    mask = np.zeros((10, 10), bool)
    mask[2:5, 2:5] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normalizer = fit_normalizer(mask, None)
    out = normalizer(mask)
    assert out.dtype == np.float32 and set(np.unique(out)) == {0.0, 1.0}


def test_count_nonfinite_by_slabs():
    image = np.zeros((5, 6, 7), np.float32)
    image[0, 0, 0] = np.nan
    image[4, 5, 6] = -np.inf
    assert count_nonfinite(image, slab_voxels=10) == 2
    assert count_nonfinite(image.astype(np.uint8)) == 0


def test_one_nan_pixel_leaves_the_probabilities_finite():
    image = RNG.random((32, 32)).astype(np.float32)
    image[5, 5] = np.nan
    with pytest.warns(NonFiniteValuesWarning):
        probabilities = drain(predict_probabilities(image, tiny_model(2, depth=2, base=2), device="cpu"))
    assert np.isfinite(np.asarray(probabilities, np.float32)).all()
