"""The quick estimate of an image's object size (``--object-size auto``, the dock's Estimate)."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_unet.engine.estimate import central_crop, estimate_object_size, zoom_from_estimate
from napari_unet.progress import drain
from napari_unet.zoo.loading import load_model

from ..conftest import tiny_model
from .test_resample import nuclei


@pytest.fixture(scope="module")
def nuclei_2d():
    return load_model("nuclei-2d")


def test_estimate_finds_the_object_size_and_zooms_only_when_it_matters(nuclei_2d):
    image, labels = nuclei((300, 300), 60, 13)
    true = 2 * np.sqrt(np.bincount(labels.ravel())[1:].mean() / np.pi)
    diameter = drain(estimate_object_size(image, nuclei_2d, device="cpu"))
    assert abs(diameter - true) < 0.15 * true
    # about the model's own size: no resampling
    assert zoom_from_estimate(nuclei_2d, None, diameter)[0] is None
    # twice as large: found, and the zoom brings them back
    large = ndi.zoom(image, 2.0, order=1)
    diameter = drain(estimate_object_size(large, nuclei_2d, device="cpu"))
    assert abs(diameter - 2 * true) < 0.15 * 2 * true
    scale, source = zoom_from_estimate(nuclei_2d, None, diameter)
    own = nuclei_2d.object_size["diameter_voxels"]
    assert scale == pytest.approx((own / diameter,) * 2) and "estimated" in source


def test_crop_is_central_and_a_2d_model_takes_the_middle_slice(nuclei_2d):
    stack = np.arange(5 * 500 * 40, dtype=np.float32).reshape(5, 500, 40)
    crop = central_crop(stack, nuclei_2d)
    assert crop.shape == (384, 40)
    np.testing.assert_array_equal(crop, stack[2, 58:442])


def test_estimate_refuses_what_it_cannot_measure():
    semantic = tiny_model(2, task="semantic", class_names=["bg", "a", "b"])
    with pytest.raises(ValueError, match="semantic"):
        drain(estimate_object_size(np.zeros((32, 32), np.float32), semantic))
    with pytest.raises(ValueError, match="does not store"):
        drain(estimate_object_size(np.zeros((32, 32), np.float32), tiny_model(2)))
