"""The training objects' size, and post-processing relative to it."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unet.engine.predict import postprocess_settings, shape_settings
from napari_unet.labels.object_size import measure_object_size, median_volume, object_radius
from napari_unet.model.checkpoint import list_pretrained, load_checkpoint, save_checkpoint

from ..conftest import tiny_model


def _cubes() -> np.ndarray:
    labels = np.zeros((20, 40, 40), np.uint16)
    labels[2:10, 2:10, 2:10] = 1    # 512 voxels
    labels[2:10, 20:30, 2:10] = 2   # 640
    labels[12:20, 2:12, 2:12] = 3   # 800
    return labels


def test_measure_object_size_in_voxels_and_um():
    size = measure_object_size([_cubes()], (2.0, 0.5, 0.5), measured_on="cubes")
    assert size["volume_voxels"] == 640 and size["n_objects"] == 3
    assert size["diameter_voxels"] == pytest.approx((6 * 640 / np.pi) ** (1 / 3), rel=1e-3)
    assert size["diameter_um"] == pytest.approx((6 * 640 * 0.5 / np.pi) ** (1 / 3), rel=1e-3)
    assert measure_object_size([_cubes()])["diameter_um"] is None
    with pytest.raises(ValueError):
        measure_object_size([np.zeros((4, 4), np.uint8)])


def test_min_size_and_radius_follow_the_voxel_size():
    size = measure_object_size([_cubes()], (1.0, 1.0, 1.0))
    model = tiny_model(3)
    model.voxel_size = [1.0, 1.0, 1.0]
    model.object_size = size
    model.postprocess = {"threshold": 0.5, "min_size": 64, "min_size_fraction": 0.1}
    assert postprocess_settings(model)[1] == 64  # at the training resolution: the stored count
    assert postprocess_settings(model, voxel_size=(1.0, 1.0, 1.0))[1] == 64
    # voxels twice as large per axis: the same physical minimum is 8x fewer voxels
    assert postprocess_settings(model, voxel_size=(2.0, 2.0, 2.0))[1] == 8
    assert postprocess_settings(model, min_size=5, voxel_size=(2.0, 2.0, 2.0))[1] == 5
    assert median_volume(size, (2.0, 2.0, 2.0), [1.0] * 3) == pytest.approx(80, rel=1e-3)
    # radius: µm with voxel sizes on both sides, else voxels (scaled by the voxel volume)
    assert object_radius(size, (2.0, 2.0, 2.0), [1.0] * 3) == pytest.approx(size["diameter_um"] / 2)
    assert object_radius(size, None) == pytest.approx(size["diameter_voxels"] / 2)
    assert object_radius(size, (8.0, 1.0, 1.0)) == pytest.approx(size["diameter_voxels"])
    assert shape_settings(model, None)["object_radius"] == pytest.approx(size["diameter_voxels"] / 2)
    assert object_radius({}, None) is None


def test_object_size_travels_in_the_checkpoint(tmp_path):
    model = tiny_model(2)
    model.object_size = measure_object_size([_cubes()[5]], measured_on="a slice")
    path = save_checkpoint(model, tmp_path / "m.pt")
    assert load_checkpoint(path).object_size == model.object_size
    import torch

    assert torch.load(path, weights_only=True)["metadata"]["object_size"]["measured_on"] == "a slice"


def test_shipped_models_know_their_object_size():
    for name, path in list_pretrained().items():
        size = load_checkpoint(path).object_size
        assert size["diameter_voxels"] > 5, name
        assert (size["diameter_um"] is not None) == (name == "nuclei-3d"), name


# --- the data's object size -> the zoom per axis ------------------------------------------------


def test_parse_object_size_units_and_errors():
    from napari_unet.labels.object_size import parse_object_size

    assert parse_object_size("12") == (12.0, None)
    assert parse_object_size(" 12.5px ") == (12.5, "px")
    assert parse_object_size("3um") == (3.0, "um") == parse_object_size("3 µm")
    assert parse_object_size(7) == (7.0, None)
    for bad in ("0", "-1", "nan", "inf", "12mm", "", "px", "twelve"):
        with pytest.raises(ValueError):
            parse_object_size(bad)


def test_network_scale_from_sizes_and_voxel_sizes():
    from napari_unet.labels.object_size import network_scale

    size_2d = {"diameter_voxels": 30.0, "diameter_um": None, "volume_voxels": 700.0}
    # pixels: the training diameter over the data's, on every axis
    assert network_scale(size_2d, None, 2, None, (15.0, "px"))[0] == (2.0, 2.0)
    # a bare number is pixels without a voxel size, µm with one
    assert network_scale(size_2d, None, 2, None, (15.0, None))[0] == (2.0, 2.0)
    assert network_scale(size_2d, None, 2, (0.5, 0.5), (15.0, None))[0] == (1.0, 1.0)
    with pytest.raises(ValueError, match="voxel size"):
        network_scale(size_2d, None, 2, None, (15.0, "um"))
    with pytest.raises(ValueError, match="does not store"):
        network_scale({}, None, 2, None, (15.0, "px"))
    # a 3D model trained at (0.28, 0.127, 0.127) µm on objects of 2.7 µm
    size_3d = {"diameter_voxels": 16.0, "diameter_um": 2.7, "volume_voxels": 2000.0}
    model_voxel = (0.28, 0.127, 0.127)
    # default: the image's voxel size against the model's, per axis (anisotropy)
    scale, source = network_scale(size_3d, model_voxel, 3, (0.56, 0.254, 0.127))
    assert scale == pytest.approx((2.0, 2.0, 1.0)) and "voxel size" in source
    assert network_scale(size_3d, model_voxel, 3, (0.28, 0.13, 0.127))[0] is None  # within 5%
    assert network_scale(size_3d, model_voxel, 3, None)[0] is None
    # objects twice as large in µm on the training voxel size: half the zoom on every axis
    scale, _ = network_scale(size_3d, model_voxel, 3, model_voxel, (5.4, "um"))
    assert scale == pytest.approx((0.5, 0.5, 0.5))
    # in pixels on an anisotropic image: the ratio of diameters, anisotropy kept
    scale, _ = network_scale(size_3d, model_voxel, 3, (0.56, 0.254, 0.254), (8.0, "px"))
    assert np.prod(scale) ** (1 / 3) == pytest.approx(2.0)
    assert scale[1] == pytest.approx(scale[2]) and scale[0] == pytest.approx(scale[1])
