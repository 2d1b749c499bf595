"""OME-Zarr writing and reading: pyramids (chunk-wise), NGFF metadata, atomic replace, export."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from napari_unet.io.label_export import export_labels
from napari_unet.io.omezarr import (
    downsample,
    is_ome_zarr,
    ngff_axes,
    pyramid_factors,
    read_ome_zarr,
    write_ome_zarr,
)
from napari_unet.io.writers import write_image_tiff
from napari_unet.progress import drain

pytest.importorskip("ome_zarr")
RNG = np.random.default_rng(5)


def _validate(path):
    models = pytest.importorskip("ome_zarr_models.v05")
    return models.Image.from_zarr(zarr.open_group(str(path), mode="r"))


def test_pyramid_factors_halve_the_finer_axes_first():
    assert pyramid_factors((10, 1000, 1000), (4.0, 1.0, 1.0), "ZYX") == [
        (1, 2, 2), (1, 2, 2), (2, 2, 2)]
    assert pyramid_factors((3, 300, 200), None, "CYX") == [(1, 2, 2)] * 2  # channels never
    assert pyramid_factors((64, 100), None, "YX") == []  # small: one level


def test_downsample_labels_by_nearest_images_by_mean():
    labels = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=np.uint32)
    np.testing.assert_array_equal(downsample(labels, (2, 2), labels=True), [[1, 3], [7, 9]])
    image = np.array([[0, 2, 10], [4, 6, 10]], dtype=np.uint8)
    # edges repeat: the last block is (10, 10, 10, 10)
    np.testing.assert_array_equal(downsample(image, (2, 2), labels=False), [[3, 10]])


def test_ngff_axes_units():
    assert ngff_axes("CZYX", "um") == [{"name": "c", "type": "channel"},
                                       *({"name": a, "type": "space", "unit": "micrometer"}
                                         for a in "zyx")]
    assert ngff_axes("YX", None) == [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]


def test_write_read_roundtrip_chunkwise_and_atomic(tmp_path):
    image = RNG.integers(0, 4000, size=(2, 300, 170)).astype(np.uint16)
    labels = np.zeros((300, 170), dtype=np.uint16)
    labels[10:100, 20:60] = 4
    out = tmp_path / "x.ome.zarr"
    updates = []
    drain(write_ome_zarr(out, image, {"cells": labels}, axes="CYX", voxel_size=(0.3, 0.2),
                         unit="um", chunks=(64, 64)), updates.append)
    assert len(updates) > 10  # chunk by chunk
    assert is_ome_zarr(out) and not list(tmp_path.glob(".*tmp"))
    pyramid, (cells,) = read_ome_zarr(out)
    assert pyramid.axes == "CYX" and pyramid.scale == (1.0, 0.3, 0.2) and pyramid.unit == "um"
    assert [tuple(a.shape) for a in pyramid.levels] == [(2, 300, 170), (2, 150, 85), (2, 75, 43)]
    np.testing.assert_array_equal(pyramid.levels[0].compute(), image)
    assert cells.name == "cells" and cells.scale == (0.3, 0.2)
    np.testing.assert_array_equal(cells.levels[0].compute(), labels)
    np.testing.assert_array_equal(cells.levels[2].compute(), labels[::4, ::4])
    assert list(_validate(out).labels.attributes.ome.labels) == ["cells"]
    # written again: replaced as a whole, never half-written
    drain(write_ome_zarr(out, image[:, :50, :50], {}, axes="CYX", voxel_size=None, unit=None))
    pyramid, labels_back = read_ome_zarr(out)
    assert pyramid.levels[0].shape == (2, 50, 50) and labels_back == []
    with pytest.raises(ValueError, match="do not match"):
        drain(write_ome_zarr(tmp_path / "y.ome.zarr", image, {"a": labels[:10]}, axes="CYX",
                             voxel_size=None, unit=None))
    assert not (tmp_path / "y.ome.zarr").exists()


def test_export_labels_to_ome_zarr_with_the_image_or_its_file(tmp_path):
    image = RNG.integers(0, 255, size=(5, 40, 30)).astype(np.uint8)
    labels = np.zeros(image.shape, dtype=np.uint16)
    labels[1:4, 5:20, 5:12] = 1
    written, summary = export_labels(tmp_path / "a.ome.zarr", labels, mode="as in the layer",
                                     voxel_size=(1.0, 0.5, 0.5), unit="um", image=image,
                                     name="nuclei labels")
    assert written == [tmp_path / "a.ome.zarr"] and "1 objects" in summary
    pyramid, (back,) = read_ome_zarr(written[0])
    assert back.name == "nuclei_labels" and back.scale == (1.0, 0.5, 0.5)
    np.testing.assert_array_equal(back.levels[0].compute(), labels)
    np.testing.assert_array_equal(pyramid.levels[0].compute(), image)
    _validate(written[0])
    # without the image in hand: the file the labels came from
    source = write_image_tiff(tmp_path / "in.tif", image)
    written, _ = export_labels(tmp_path / "b.ome.zarr", labels, mode="binary",
                               voxel_size=(1.0, 0.5, 0.5), unit="um", input_path=str(source))
    np.testing.assert_array_equal(read_ome_zarr(written[0])[0].levels[0].compute(), image)
    with pytest.raises(ValueError, match="open the image"):
        export_labels(tmp_path / "c.ome.zarr", labels, mode="binary", voxel_size=(1, 1, 1),
                      unit="um")
    with pytest.raises(ValueError, match="overwrite the input"):
        export_labels(tmp_path / "a.ome.zarr", labels, mode="binary", voxel_size=(1, 1, 1),
                      unit="um", input_path=str(tmp_path / "a.ome.zarr"))
    assert not (tmp_path / "c.ome.zarr").exists()
