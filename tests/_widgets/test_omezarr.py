"""OME-Zarr in napari: our outputs open through napari-ome-zarr (a reader we did not write)
with the right scale and labels; our reader opens OME-Zarr images and labels lazily; the
Export dock writes OME-Zarr."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from napari_unet._widgets._launch import PLUGIN
from napari_unet.io.omezarr import read_ome_zarr, write_ome_zarr
from napari_unet.progress import drain

from .conftest import blobs, click, wait_idle

pytest.importorskip("ome_zarr")


def _ome_zarr(tmp_path, name="cells.ome.zarr"):
    image, labels = blobs((8, 300, 260))
    path = drain(write_ome_zarr(tmp_path / name, image.astype(np.float32), {"nuclei": labels},
                                axes="ZYX", voxel_size=(2.0, 0.5, 0.5), unit="um"))
    return path, image, labels


def test_our_ome_zarr_opens_in_napari_ome_zarr(make_napari_viewer, tmp_path):
    pytest.importorskip("napari_ome_zarr")
    path, image, labels = _ome_zarr(tmp_path)
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin="napari-ome-zarr")
    kinds = sorted(type(layer).__name__ for layer in layers)
    assert kinds == ["Image", "Labels"]
    for layer in layers:
        np.testing.assert_allclose(layer.scale, (2.0, 0.5, 0.5))
        assert layer.multiscale and len(layer.data) == 3
    label_layer = next(layer for layer in layers if type(layer).__name__ == "Labels")
    np.testing.assert_array_equal(np.asarray(label_layer.data[0]), labels)


def test_our_reader_opens_the_pyramid_and_labels_lazily(make_napari_viewer, tmp_path):
    path, image, labels = _ome_zarr(tmp_path)
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin=PLUGIN)
    assert [type(layer).__name__ for layer in layers] == ["Image", "Labels"]
    picture, nuclei = layers
    assert picture.name == "cells" and nuclei.name == "cells nuclei"
    assert picture.multiscale and nuclei.multiscale
    assert all(isinstance(level, da.Array) for level in (*picture.data, *nuclei.data))
    np.testing.assert_allclose(nuclei.scale, (2.0, 0.5, 0.5))
    np.testing.assert_allclose(picture.scale, (2.0, 0.5, 0.5))
    assert nuclei.metadata["napari_unet_unit"] == "um"
    np.testing.assert_array_equal(np.asarray(nuclei.data[0]), labels)


def test_export_dock_writes_ome_zarr_with_the_image(make_napari_viewer, qtbot, tmp_path):
    from napari_unet._widgets._export import ExportWidget

    image, labels = blobs((6, 40, 40))
    viewer = make_napari_viewer()
    viewer.add_image(image, name="raw", scale=(1.0, 0.25, 0.25))
    layer = viewer.add_labels(labels, name="nuclei labels", scale=(1.0, 0.25, 0.25))
    layer.metadata["napari_unet_unit"] = "um"
    widget = ExportWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Export")
    widget.labels_combo.setCurrentText("nuclei labels")
    widget.path_edit.setText(str(tmp_path / "out.ome.zarr"))
    click(qtbot, widget, "Export")
    wait_idle(qtbot, widget)
    assert "Wrote out.ome.zarr" in widget.status.text()
    pyramid, (back,) = read_ome_zarr(tmp_path / "out.ome.zarr")
    np.testing.assert_array_equal(pyramid.levels[0].compute(), image)
    np.testing.assert_array_equal(back.levels[0].compute(), labels)
    assert back.scale == (1.0, 0.25, 0.25) and back.unit == "um"
