"""Streamed outputs written as OME-Zarr (.ome.zarr): same labels as in memory, NGFF metadata a
client we did not write reads (napari-ome-zarr, ome-zarr-models), resumable, on dask too."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from scipy import ndimage as ndi

from napari_unet.bigdata.store import stream_info
from napari_unet.bigdata.streaming import predict_to_zarr
from napari_unet.engine.predict import segment
from napari_unet.io.omezarr import read_ome_zarr
from napari_unet.progress import drain

from .test_streaming import _balls, _same_partition, mask_model, reference, tiny_model

pytest.importorskip("ome_zarr")


def _validate(path):
    """The metadata as ome-zarr-models (NGFF 0.5) reads it: the image and its label names."""
    models = pytest.importorskip("ome_zarr_models.v05")
    image = models.Image.from_zarr(zarr.open_group(str(path), mode="r"))
    return image, list(image.labels.attributes.ome.labels) if image.labels is not None else []


def _napari_ome_zarr_layers(path):
    reader_module = pytest.importorskip("napari_ome_zarr")
    reader = reader_module.napari_get_reader(str(path))
    assert reader is not None, "napari-ome-zarr does not recognise the output"
    return {kwargs.get("name") or "image": (data, kwargs, kind) for data, kwargs, kind in reader(str(path))}


def test_streamed_semantic_instances_into_ome_zarr_equal_in_memory(tmp_path):
    classes = np.zeros((300, 280), dtype=np.float32)
    classes[5:150, 15:125] = 1   # across the chunk faces: one object
    classes[200:290, 10:200] = 2
    model = mask_model(2, semantic=True)
    out = tmp_path / "s.ome.zarr"
    result = drain(predict_to_zarr(classes, model, out, output="instances", min_overlap=0,
                                   tile_shape=(96, 96), voxel_size=(0.5, 0.25), unit="um"))
    expected = drain(segment(classes, model, output="instances", device="cpu")).data
    assert result.n_objects == 2 == expected.max()
    group = zarr.open_group(str(out), mode="r")
    instances = group["labels/instances/0"][...]
    assert _same_partition(instances, expected)
    np.testing.assert_array_equal(group["labels/labels/0"][...], classes.astype(np.uint8))
    np.testing.assert_array_equal(result.data[...], instances)
    np.testing.assert_array_equal(group["0"][...], classes)  # the input at the root
    assert "_local" not in group

    image, label_names = _validate(out)
    assert sorted(label_names) == ["instances", "labels"]
    multiscale = image.attributes.ome.multiscales[0]
    assert [a.unit for a in multiscale.axes] == ["micrometer", "micrometer"]
    scales = [d.coordinateTransformations[0].scale for d in multiscale.datasets]
    # x (finer) is halved first, then both, until each side is at most 128
    assert scales == [[0.5, 0.25], [0.5, 0.5], [1.0, 1.0], [2.0, 2.0]]
    label_attrs = dict(group["labels/labels"].attrs)["ome"]
    assert label_attrs["image-label"]["properties"] == [
        {"label-value": 1, "class": "a"}, {"label-value": 2, "class": "b"}]
    # every level of a label pyramid holds ids of the full resolution (nearest, not averaged)
    level1 = group["labels/instances/1"][...]
    np.testing.assert_array_equal(level1, instances[:, ::2])

    layers = _napari_ome_zarr_layers(out)
    kinds = sorted(kind for _, _, kind in layers.values())
    assert kinds == ["image", "labels", "labels"]
    for data, kwargs, kind in layers.values():
        assert list(kwargs["scale"]) == [0.5, 0.25]
        assert isinstance(data, list) and len(data) == 4  # multiscale pyramid, lazily read


def test_ome_zarr_output_resumes_in_tiles_and_in_the_pyramid(tmp_path):
    mask = _balls((16, 140, 140), [(8, 60, 60), (4, 10, 120)], 6)
    model = mask_model(3)
    out = tmp_path / "out.ome.zarr"
    options = dict(output="instances", tile_shape=(12, 64, 64), voxel_size=(2.0, 0.5, 0.5),
                   unit="um")
    drain(predict_to_zarr(mask, model, out, max_tiles=3, **options))
    assert stream_info(out)["ome"] == "pending"
    job = predict_to_zarr(mask, model, out, **options)
    for update in job:  # stopped while the pyramid is built
        if update.stage == "postprocess" and "pyramid" in (update.message or ""):
            break
    job.close()
    assert stream_info(out)["ome"] == "pending"
    result = drain(predict_to_zarr(mask, model, out, **options))
    assert result.tiles_skipped == result.tiles_total and result.n_objects == 2
    assert stream_info(out)["ome"] == "done"
    image, labels = read_ome_zarr(out)
    assert image.scale == (2.0, 0.5, 0.5) and image.unit == "um"
    assert [lab.name for lab in labels] == ["instances"]
    assert _same_partition(np.asarray(labels[0].levels[0]), ndi.label(mask)[0])
    assert [tuple(level.shape) for level in labels[0].levels] == [(16, 140, 140), (16, 70, 70)]
    _validate(out)
    again = drain(predict_to_zarr(mask, model, out, **options))
    assert "already complete" in again.messages


def test_cli_predict_to_ome_zarr_opens_in_napari_ome_zarr(tmp_path, capsys):
    from napari_unet.cli.main import main
    from napari_unet.io.writers import write_image_tiff
    from napari_unet.model.checkpoint import save_checkpoint

    model = tiny_model(3)
    checkpoint = save_checkpoint(model, tmp_path / "tiny.pt")
    image = np.random.default_rng(1).integers(0, 4000, size=(16, 150, 140)).astype(np.uint16)
    source = write_image_tiff(tmp_path / "in.tif", image, voxel_size=(2.0, 0.5, 0.5), unit="um")
    out = tmp_path / "out.ome.zarr"
    argv = ["predict", str(source), "-o", str(out), "--model", str(checkpoint), "--device", "cpu",
            "--tile", "16,64,64"]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    from napari_unet.labels.instances import to_semantic

    expected = to_semantic(reference(image, model), "foreground")
    group = zarr.open_group(str(out), mode="r")
    np.testing.assert_array_equal(group["labels/labels/0"][...], expected)
    np.testing.assert_array_equal(group["0"][...], image)
    _validate(out)
    layers = _napari_ome_zarr_layers(out)
    labels = [(d, k) for d, k, kind in layers.values() if kind == "labels"]
    assert len(labels) == 1
    data, kwargs = labels[0]
    assert list(kwargs["scale"]) == [2.0, 0.5, 0.5]
    np.testing.assert_array_equal(np.asarray(data[0]), expected)
    assert main(argv) == 0  # run again: already complete
    assert "resumed" in capsys.readouterr().out
