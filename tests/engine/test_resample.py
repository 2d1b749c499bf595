"""Per-tile resampling by the object size: exact tiling, shapes, and objects of another size."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

from napari_unet.engine.planning import make_plan
from napari_unet.engine.predict import postprocess_settings, predict_probabilities, segment
from napari_unet.engine.resample import (
    axis_window,
    network_length,
    scale_for_model,
    tile_windows,
    to_image,
    to_network,
)
from napari_unet.model.normalization import fit_normalizer
from napari_unet.progress import drain

from ..conftest import tiny_model

MODEL_2D = tiny_model(2, depth=3, base=4)
MODEL_3D = tiny_model(3, depth=3, base=2, inplane_only_levels=(0,))


def predict(image, model, **options):
    return drain(predict_probabilities(image, model, device="cpu", precision="fp32",
                                       dtype=np.float32, **options))


def reference(image, model, scale):
    """The whole image zoomed onto the network's grid, one forward pass, zoomed back."""
    plan = make_plan(image, model, scale=scale, tile_shape=(10**6,) * image.ndim)
    whole = tuple(slice(0, n) for n in image.shape)
    windows = tile_windows(whole, image.shape, plan.scale, plan.net_halo, plan.net_divisor)
    x = to_network(fit_normalizer(image, model.normalization)(image)[None], windows)
    with torch.inference_mode():
        p = torch.sigmoid(model.network.eval()(torch.from_numpy(x)[None])).numpy()[0]
    return to_image(p, windows)


@settings(max_examples=40, deadline=None)
@given(length=st.integers(1, 300), scale=st.floats(0.2, 5.0), halo=st.sampled_from([0, 8, 56]),
       divisor=st.sampled_from([1, 4, 8]), start=st.integers(0, 299), size=st.integers(1, 80))
def test_window_reads_within_the_planned_halo(length, scale, halo, divisor, start, size):
    from napari_unet.engine.resample import image_halo

    start = start % length
    write = slice(start, min(length, start + size))
    window = axis_window(write, length, scale, halo, divisor)
    if not window.resampled:
        return
    pad = image_halo(halo, divisor, length, scale)
    assert max(0, write.start - pad) <= window.read.start
    assert window.read.stop <= min(length, write.stop + pad)
    assert window.network.start % divisor == 0
    # the core's network samples lie a halo inside the window (or at the image's border)
    m = network_length(length, scale)
    positions = np.clip(window.output_positions(), 0, m - 1)
    low, high = math.floor(positions[0]), min(m - 1, math.floor(positions[-1]) + 1)
    assert window.network.start <= low and high < window.network.stop
    assert window.network.start == 0 or low - window.network.start >= halo
    assert window.network.stop == m or window.network.stop - high - 1 >= halo
    # and the image voxels the window's samples interpolate from are read
    inputs = np.clip(window.input_positions(), 0, length - 1)
    assert window.read.start <= math.floor(inputs[0])
    assert min(length - 1, math.floor(inputs[-1]) + 1) < window.read.stop


@pytest.mark.parametrize("scale", [(0.5,), (2.0,), (0.37, 1.6), (1.0, 0.5)])
def test_tiled_zoom_equals_the_whole_image_zoomed(scale):
    image = np.random.default_rng(1).random((70, 53), dtype=np.float32)
    tiled = predict(image, MODEL_2D, scale=scale, tile_shape=(48, 64), batch_size=3)
    assert tiled.shape == (1, *image.shape)  # the image's own grid
    assert np.abs(tiled - reference(image, MODEL_2D, scale)).max() <= 1e-5
    whole = predict(image, MODEL_2D, scale=scale, tile_shape=(4096, 4096))
    assert np.abs(tiled - whole).max() <= 1e-5


def test_tiled_zoom_3d_anisotropic():
    image = np.random.default_rng(2).random((14, 40, 33), dtype=np.float32)
    scale = (1.8, 0.6, 0.75)
    tiled = predict(image, MODEL_3D, scale=scale, tile_shape=(16, 40, 40))
    assert tiled.shape == (1, *image.shape)
    assert np.abs(tiled - reference(image, MODEL_3D, scale)).max() <= 1e-5


def test_2d_model_on_a_stack_is_zoomed_in_plane_only():
    stack = np.random.default_rng(3).random((5, 40, 36), dtype=np.float32)
    zoomed = predict(stack, MODEL_2D, scale=(0.6,), tile_shape=(40, 40))
    assert zoomed.shape == (1, *stack.shape)
    for z in (0, 4):
        single = predict(stack[z], MODEL_2D, scale=(0.6,), tile_shape=(40, 40))
        assert np.abs(zoomed[:, z] - single).max() <= 1e-5


def test_scale_one_is_the_plain_run():
    image = np.random.default_rng(4).random((40, 40), dtype=np.float32)
    assert make_plan(image, MODEL_2D, scale=(1.0,)).scale is None
    assert np.array_equal(predict(image, MODEL_2D, scale=(1.0,)), predict(image, MODEL_2D))


def nuclei(shape, count, radius, seed=5):
    """Synthetic nuclei: discs, blurred, with noise; and their labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.indices(shape)
    labels = np.zeros(shape, np.int32)
    for centre in rng.uniform(radius + 5, min(shape) - radius - 5, (count, 2)):
        disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius ** 2
        if not labels[disc].any():
            labels[disc] = labels.max() + 1
    image = ndi.gaussian_filter((labels > 0).astype(np.float32), 1.5) * 100 + 10
    return image + rng.normal(0, 2, shape).astype(np.float32), labels


def test_objects_half_the_size_meet_the_network_at_its_size():
    """The shipped nuclei model on an image downscaled by 2 with the object size given
    matches its output on the original (downscaled the same way), much closer than without."""
    from napari_unet.zoo.loading import load_model

    model = load_model("nuclei-2d")
    image, _ = nuclei((256, 256), 40, 13)
    small = ndi.zoom(image, 0.5, order=1)
    diameter = model.object_size["diameter_voxels"] / 2
    scale, source = scale_for_model(model, None, (diameter, "px"))
    assert scale == pytest.approx((2.0, 2.0)) and "px" in source
    on_original = ndi.zoom(predict(image, model)[0], 0.5, order=1)
    zoomed = predict(small, model, scale=scale, tile_shape=(96, 96))[0]
    plain = predict(small, model)[0]
    assert zoomed.shape == small.shape
    error = np.abs(zoomed - on_original).mean()
    assert error < 0.01
    assert error < 0.5 * np.abs(plain - on_original).mean()


def test_post_processing_sizes_follow_the_zoom():
    model = tiny_model(2)
    model.object_size = {"diameter_voxels": 20.0, "volume_voxels": 300.0}
    model.postprocess = {"min_size": 30, "min_size_fraction": 0.1}
    assert postprocess_settings(model)[1] == 30
    assert postprocess_settings(model, scale=(2.0, 2.0))[1] == round(0.1 * 300 / 4)
    result = drain(segment(np.random.default_rng(6).random((40, 40), dtype=np.float32), model,
                           output="instances", device="cpu", scale=(0.5,)))
    assert result.data.shape == (40, 40)
