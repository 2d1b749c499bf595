"""Lazy opening of big images: TIFF through tifffile's zarr store, zarr and OME-Zarr folders."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr

from napari_unet.io.formats import ImageReadError
from napari_unet.io.lazy import estimated_nbytes, is_zarr_path, open_lazy
from napari_unet.io.readers import read_image
from napari_unet.io.writers import write_image_tiff

RNG = np.random.default_rng(1)


def test_imagej_tiff_opens_lazily_with_voxel_size(tmp_path):
    data = RNG.integers(0, 60000, size=(6, 40, 50), dtype=np.uint16)
    path = write_image_tiff(tmp_path / "stack.tif", data, voxel_size=(2.0, 0.5, 0.25), unit="um")
    image = open_lazy(path)
    assert isinstance(image.data, da.Array)
    assert image.axes == "ZYX" and image.data.shape == data.shape
    assert image.voxel_size == pytest.approx((2.0, 0.5, 0.25)) and image.unit == "um"
    np.testing.assert_array_equal(image.data[2:4, 10:20].compute(), data[2:4, 10:20])
    assert estimated_nbytes(path) == data.nbytes


def test_read_image_lazy_flag_returns_dask(tmp_path):
    data = RNG.integers(0, 255, size=(30, 20), dtype=np.uint8)
    path = write_image_tiff(tmp_path / "plane.tif", data)
    lazy = read_image(path, lazy=True)
    eager = read_image(path)
    assert isinstance(lazy.data, da.Array) and isinstance(eager.data, np.ndarray)
    np.testing.assert_array_equal(lazy.data.compute(), eager.data)


def test_tiled_ome_tiff_with_channels_lazily(tmp_path):
    data = RNG.integers(0, 4000, size=(2, 5, 64, 64), dtype=np.uint16)
    path = tmp_path / "multi.ome.tif"
    tifffile.imwrite(path, data, tile=(32, 32),
                     metadata={"axes": "CZYX", "PhysicalSizeX": 0.3, "PhysicalSizeY": 0.3,
                               "PhysicalSizeZ": 1.5})
    with pytest.raises(ImageReadError, match="channel"):
        open_lazy(path)
    image = open_lazy(path, allow_channels=True)
    assert image.axes == "CZYX" and isinstance(image.data, da.Array)
    assert image.voxel_size == pytest.approx((1.5, 0.3, 0.3))
    np.testing.assert_array_equal(image.data.compute(), data)


def test_zarr_array_folder_with_calibration_attrs(tmp_path):
    data = RNG.integers(0, 1000, size=(1, 8, 16, 12), dtype=np.uint16)
    path = tmp_path / "vol.zarr"
    array = zarr.create_array(str(path), shape=data.shape, chunks=(1, 4, 8, 6), dtype=data.dtype)
    array[...] = data
    array.attrs.update(voxel_size=[3.0, 1.0, 1.0], unit="micron")
    assert is_zarr_path(path)
    image = open_lazy(path)  # leading singleton axis (a 4D array taken as CZYX) is squeezed
    assert image.axes == "ZYX" and image.data.shape == (8, 16, 12)
    assert image.voxel_size == pytest.approx((3.0, 1.0, 1.0)) and image.unit == "um"
    eager = read_image(path)  # zarr folders also open eagerly
    assert isinstance(eager.data, np.ndarray)
    np.testing.assert_array_equal(eager.data, data[0])


def test_ome_zarr_multiscale_level0_and_scale(tmp_path):
    data = RNG.integers(0, 1000, size=(1, 6, 32, 32), dtype=np.uint16)
    root = zarr.open_group(str(tmp_path / "image.ome.zarr"), mode="w", zarr_format=2)
    root.create_array("0", shape=data.shape, chunks=(1, 3, 16, 16), dtype=data.dtype)[...] = data
    root.create_array("1", shape=(1, 6, 16, 16), chunks=(1, 3, 16, 16), dtype=data.dtype)
    root.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": "c", "type": "channel"},
                 {"name": "z", "type": "space", "unit": "micrometer"},
                 {"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [
            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 2.0, 0.4, 0.4]}]},
            {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": [1, 2.0, 0.8, 0.8]}]},
        ],
    }]
    image = open_lazy(tmp_path / "image.ome.zarr")
    assert image.axes == "ZYX" and image.data.shape == (6, 32, 32)
    assert image.voxel_size == pytest.approx((2.0, 0.4, 0.4)) and image.unit == "um"
    np.testing.assert_array_equal(image.data.compute(), data[0])


def test_zarr_time_series_is_refused(tmp_path):
    root = zarr.open_group(str(tmp_path / "t.zarr"), mode="w")
    root.create_array("0", shape=(3, 4, 8, 8), dtype="uint8")
    root.attrs["multiscales"] = [{"axes": [{"name": n} for n in "tzyx"], "datasets": [{"path": "0"}]}]
    with pytest.raises(ImageReadError, match="time series"):
        open_lazy(tmp_path / "t.zarr")


def test_group_with_several_arrays_names_them(tmp_path):
    root = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    root.create_array("a", shape=(4, 4), dtype="uint8")
    root.create_array("b", shape=(4, 4), dtype="uint8")
    with pytest.raises(ImageReadError, match="holds arrays"):
        open_lazy(tmp_path / "g.zarr")
    assert open_lazy(tmp_path / "g.zarr" / "b").data.shape == (4, 4)


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="not found"):
        open_lazy(tmp_path / "nope.tif")
