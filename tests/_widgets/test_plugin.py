"""Manifest, reader, sample data and ``napari-unet gui``."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from napari_unet._widgets._launch import DOCKS, PLUGIN
from napari_unet.io.readers import read_image

SAMPLES = Path(str(resources.files("napari_unet.sample_data")))


def test_manifest_is_valid_and_complete():
    import npe2

    pm = npe2.PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest(PLUGIN)
    assert {w.display_name for w in manifest.contributions.widgets} == {
        "Segment", "Edit", "Fine-tune", "Export", "Measurements"}
    assert {s.key for s in manifest.contributions.sample_data} == {
        "em_2d", "nuclei_2d", "nuclei_3d", "cells_3d", "ct_small"}
    assert manifest.contributions.readers and manifest.contributions.writers


def test_reader_scale_and_labels(tmp_path):
    from napari_unet._widgets._io import get_reader

    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path)) is None  # an empty folder is not a DICOM series
    reader = get_reader(str(SAMPLES / "nuclei_3d.tif"))
    (data, kwargs, kind), = reader(str(SAMPLES / "nuclei_3d.tif"))
    expected = read_image(SAMPLES / "nuclei_3d.tif")
    np.testing.assert_array_equal(data, expected.data)
    assert kind == "image" and kwargs["scale"] == pytest.approx(expected.voxel_size)
    (labels, _, kind), = reader(str(SAMPLES / "nuclei_3d_labels.tif"))
    assert kind == "labels"
    (ct, ct_kwargs, _), = get_reader(str(SAMPLES / "ct_small.nii.gz"))(str(SAMPLES / "ct_small.nii.gz"))
    assert ct_kwargs["scale"] == pytest.approx((3.0, 3.0, 3.0))
    assert ct_kwargs["metadata"]["napari_unet_unit"] == "mm"


def test_reader_opens_big_files_and_zarr_lazily(tmp_path, monkeypatch):
    import dask.array as da
    import zarr

    from napari_unet._widgets._io import get_reader
    from napari_unet.io import lazy as io_lazy

    path = str(SAMPLES / "nuclei_3d.tif")
    (eager, _, _), = get_reader(path)(path)
    assert isinstance(eager, np.ndarray)
    monkeypatch.setattr(io_lazy, "LAZY_SIZE_THRESHOLD", 1000)  # "big" = anything above 1 kB here
    (lazy, kwargs, _), = get_reader(path)(path)
    assert isinstance(lazy, da.Array)
    np.testing.assert_array_equal(lazy[50].compute(), eager[50])
    assert kwargs["scale"] == pytest.approx(read_image(path).voxel_size)
    store = tmp_path / "volume.zarr"
    zarr.create_array(store=str(store), shape=(4, 30, 30), chunks=(2, 16, 16), dtype="uint16")[:] = 7
    (from_zarr, _, _), = get_reader(str(store))(str(store))
    assert isinstance(from_zarr, da.Array) and int(from_zarr.max().compute()) == 7


def test_open_and_samples_in_viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open(str(SAMPLES / "em_2d.tif"), plugin=PLUGIN)
    assert viewer.layers[-1].data.shape == (512, 512)
    for key, ndim in (("em_2d", 2), ("nuclei_2d", 2), ("nuclei_3d", 3), ("cells_3d", 3),
                      ("ct_small", 3)):
        viewer.open_sample(PLUGIN, key)
        assert viewer.layers[-1].ndim == ndim
    assert tuple(viewer.layers[-1].scale) == pytest.approx((3.0, 3.0, 3.0))


def test_gui_command_opens_docks_and_sample(make_napari_viewer, registry):
    from napari_unet._widgets._launch import launch

    viewer = launch(None, viewer=make_napari_viewer(), sample="em_2d")
    assert {f"{name} ({PLUGIN})" for name in DOCKS} <= set(viewer.window.dock_widgets)
    assert viewer.layers[-1].name == "em_2d"
    viewer2 = launch(SAMPLES / "nuclei_2d.tif", viewer=make_napari_viewer())
    assert viewer2.layers[-1].data.shape == (520, 696)


def test_gui_subcommand_is_registered():
    from napari_unet.cli.main import build_parser, main

    args = build_parser().parse_args(["gui", "some.tif"])
    assert args.file == "some.tif"
    assert main(["gui", "/does/not/exist.tif"]) == 2
