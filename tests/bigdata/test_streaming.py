"""Streamed inference into zarr: equal to in-memory, bounded reads, resume, instances across chunks."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import torch
import zarr
from scipy import ndimage as ndi

from napari_unet.bigdata import streaming as streaming_streaming
from napari_unet.bigdata.store import stream_info
from napari_unet.bigdata.streaming import predict_to_zarr
from napari_unet.engine.planning import make_plan
from napari_unet.engine.predict import predict_probabilities, segment
from napari_unet.labels.instances import to_semantic
from napari_unet.model.checkpoint import SegmentationModel, save_checkpoint
from napari_unet.model.config import UNetConfig
from napari_unet.model.normalization import Normalizer
from napari_unet.model.unet import UNet
from napari_unet.progress import drain

from ..conftest import tiny_model as conftest_tiny_model

RNG = np.random.default_rng(0)


def tiny_model(dims: int = 3, seed: int = 0, task: str = "foreground") -> SegmentationModel:
    """UNet base 4, depth 2, with non-trivial batch norm statistics."""
    return conftest_tiny_model(dims, depth=2, base=4, task=task, seed=seed)


def mask_model(dims: int, semantic: bool = False) -> SegmentationModel:
    """A depth-1 UNet whose output is (almost exactly) its 0/1 input: probability = input.

    ``semantic``: three classes, input value = class id (0, 1 or 2).
    """
    network = UNet(UNetConfig(spatial_dims=dims, base_channels=1, depth=1,
                              out_channels=3 if semantic else 1))
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)) and module.kernel_size[0] == 3:
                module.weight.zero_()
                module.weight[(0, 0) + (1,) * dims] = 1.0
            elif isinstance(module, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
                module.running_mean.zero_()
                module.running_var.fill_(1.0 - module.eps)
                module.weight.fill_(1.0)
                module.bias.zero_()
        if semantic:  # logits 0, 10x - 5, 50x - 80: argmax = x for x in {0, 1, 2}
            network.head.weight.copy_(torch.tensor([0.0, 10.0, 50.0]).reshape(3, 1, *(1,) * dims))
            network.head.bias.copy_(torch.tensor([0.0, -5.0, -80.0]))
            return SegmentationModel(network.eval(), task="semantic", class_names=["bg", "a", "b"],
                                     normalization={"mode": "none"})
        network.head.weight.fill_(20.0)
        network.head.bias.fill_(-10.0)
    return SegmentationModel(network.eval(), normalization={"mode": "none"})


def reference(image, model) -> np.ndarray:
    return drain(predict_probabilities(image, model, device="cpu", dtype=np.float32))


class CountingArray:
    """A sliceable array that records how many voxels each read returns."""

    def __init__(self, data: np.ndarray):
        self.data, self.reads = data, []

    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)
    dtype = property(lambda self: self.data.dtype)

    def __getitem__(self, index):
        part = self.data[index]
        self.reads.append(part.size)
        return part


# --- equality with in-memory inference ------------------------------------------------------


@pytest.mark.parametrize("kind", ["numpy", "dask", "zarr"])
def test_streamed_3d_equals_in_memory(tmp_path, kind):
    model = tiny_model(3)
    image = RNG.integers(0, 4000, size=(22, 46, 40)).astype(np.uint16)
    expected = reference(image, model)
    if kind == "dask":
        source = da.from_array(image, chunks=(7, 20, 20))
    elif kind == "zarr":
        source = zarr.create_array(str(tmp_path / "in.zarr"), shape=image.shape, chunks=(5, 16, 16),
                                   dtype=image.dtype)
        source[...] = image
    else:
        source = image
    result = drain(predict_to_zarr(source, model, tmp_path / "out.zarr", output="labels",
                                   probabilities=True, tile_shape=(28, 32, 32)))
    probs = result.arrays["probabilities"]
    assert result.tiles_total > 4
    assert probs.dtype == np.float32
    assert np.abs(probs[...] - expected).max() <= 1e-5
    np.testing.assert_array_equal(result.data[...], to_semantic(expected, "foreground"))
    # output chunks are the tile cores, on the network's pooling grid
    plan = make_plan(image, model, tile_shape=(28, 32, 32))
    assert result.data.chunks == plan.core
    assert all(c % d == 0 or c == n for c, d, n in zip(plan.core, plan.divisor, image.shape))
    assert stream_info(tmp_path / "out.zarr")["state"] == "done"


def test_streamed_2d_model_on_a_stack_and_2d_image(tmp_path):
    model = tiny_model(2, task="foreground_boundary")
    stack = RNG.random((5, 40, 36), dtype=np.float32)
    expected = reference(stack, model)
    result = drain(predict_to_zarr(stack, model, tmp_path / "stack.zarr", output="probabilities",
                                   tile_shape=(2, 32, 30)))
    assert result.data.chunks == (2, 2, 12, 10)
    assert result.data.shape == (2, 5, 40, 36)
    assert np.abs(result.data[...] - expected).max() <= 1e-5

    plane = stack[0]
    result = drain(predict_to_zarr(plane, model, tmp_path / "plane.zarr", output="probabilities",
                                   tile_shape=(32, 30)))
    assert np.abs(result.data[...] - reference(plane, model)).max() <= 1e-5


def test_reads_are_tiles_not_the_volume(tmp_path):
    model = tiny_model(3)
    image = CountingArray(RNG.random((24, 48, 48), dtype=np.float32))
    drain(predict_to_zarr(image, model, tmp_path / "out.zarr", tile_shape=(24, 32, 32),
                          normalizer=Normalizer(0.0, 1.0)))
    plan = make_plan(image, model, tile_shape=(24, 32, 32))
    largest_tile = max(int(np.prod(t.read_shape)) for t in plan.tiles())
    # first the input's fingerprint (3 small blocks per axis, to refuse a resume from another
    # image), then the tiles
    sample, tiles = image.reads[:27], image.reads[27:]
    assert max(sample) <= 4 * 16 * 16 and sum(sample) <= 27 * 4 * 16 * 16
    assert len(tiles) == plan.n_tiles
    assert max(tiles) == largest_tile < image.data.size


def test_normalisation_is_fitted_once_and_stored(tmp_path):
    model = tiny_model(3)
    image = RNG.integers(100, 5000, size=(16, 40, 40)).astype(np.uint16)
    drain(predict_to_zarr(image, model, tmp_path / "out.zarr", tile_shape=(16, 24, 24)))
    stored = stream_info(tmp_path / "out.zarr")["normalizer"]
    low, high = np.percentile(image, [1.0, 99.8])
    assert stored["offset"] == pytest.approx(low)
    assert stored["scale"] == pytest.approx(1 / (high - low))


def _tta_reference(image, model) -> np.ndarray:
    return drain(predict_probabilities(image, model, device="cpu", precision="fp32", tta=True,
                                       dtype=np.float32))


@pytest.mark.parametrize("dims", [3, 2])
def test_streamed_tta_equals_in_memory_tta(tmp_path, dims):
    model = tiny_model(dims)
    image = RNG.integers(0, 4000, size=(6, 36, 36) if dims == 3 else (3, 40, 36)).astype(np.uint16)
    expected = _tta_reference(image, model)
    plain = drain(predict_probabilities(image, model, device="cpu", precision="fp32", dtype=np.float32))
    assert np.abs(expected - plain).max() > 1e-3  # TTA changes the result
    notes = []
    result = drain(predict_to_zarr(image, model, tmp_path / "out.zarr", probabilities=True,
                                   precision="fp32", tta=True,
                                   tile_shape=(6, 32, 32) if dims == 3 else (36, 32)),
                   lambda p: p.message and notes.append(p.message))
    assert result.tiles_total > 3 and any("TTA x8" in n for n in notes)
    assert np.abs(result.arrays["probabilities"][...] - expected).max() <= 1e-5
    np.testing.assert_array_equal(result.data[...], to_semantic(expected, "foreground"))
    assert stream_info(tmp_path / "out.zarr")["fingerprint"]["settings"]["tta"] is True


def test_resume_with_another_tta_setting_is_refused_or_starts_over(tmp_path):
    model = tiny_model(3)
    image = RNG.integers(0, 4000, size=(6, 36, 36)).astype(np.uint16)
    out = tmp_path / "out.zarr"
    options = dict(probabilities=True, precision="fp32", tile_shape=(6, 36, 32))  # 3 tiles
    drain(predict_to_zarr(image, model, out, max_tiles=2, **options))  # interrupted, no TTA
    with pytest.raises(FileExistsError, match="other settings"):
        drain(predict_to_zarr(image, model, out, tta=True, **options))
    assert int(np.asarray(zarr.open_group(str(out))["_done"][...]).sum()) == 2  # left as it was
    # overwrite: starts over with TTA, and a TTA run then resumes as any other
    drain(predict_to_zarr(image, model, out, tta=True, overwrite=True, max_tiles=2, **options))
    result = drain(predict_to_zarr(image, model, out, tta=True, **options))
    assert result.tiles_skipped == 2 and result.tiles_total > 2
    assert np.abs(result.arrays["probabilities"][...] - _tta_reference(image, model)).max() <= 1e-5
    with pytest.raises(FileExistsError, match="other settings"):
        drain(predict_to_zarr(image, model, out, **options))  # done with TTA: not reused without


# --- resume ---------------------------------------------------------------------------------


def test_interrupted_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    model = tiny_model(3)
    image = RNG.integers(0, 4000, size=(20, 48, 40)).astype(np.uint16)
    expected = reference(image, model)
    out = tmp_path / "out.zarr"
    job = predict_to_zarr(image, model, out, output="labels", probabilities=True, tile_shape=(20, 28, 28))
    for update in job:  # interrupted after 4 tiles (the generator is dropped mid-run)
        if update.done == 4:
            break
    job.close()
    info = stream_info(out)
    assert info["state"] == "predicting"
    assert int(np.asarray(zarr.open_group(str(out))["_done"][...]).sum()) == 4

    calls = []
    original = streaming_streaming.TileWriter.predict
    monkeypatch.setattr(streaming_streaming.TileWriter, "predict",
                        lambda self, tile: calls.append(tile) or original(self, tile))
    result = drain(predict_to_zarr(image, model, out, output="labels", probabilities=True,
                                   tile_shape=(20, 28, 28)))
    assert result.tiles_skipped == 4
    assert len(calls) == result.tiles_total - 4
    assert np.abs(result.arrays["probabilities"][...] - expected).max() <= 1e-5
    np.testing.assert_array_equal(result.data[...], to_semantic(expected, "foreground"))
    again = drain(predict_to_zarr(image, model, out, output="labels", probabilities=True,
                                  tile_shape=(20, 28, 28)))
    assert again.tiles_skipped == again.tiles_total


def test_existing_output_of_another_model_is_refused(tmp_path):
    image = RNG.random((8, 32, 32), dtype=np.float32)
    out = tmp_path / "out.zarr"
    drain(predict_to_zarr(image, tiny_model(3, seed=0), out, max_tiles=1, tile_shape=(8, 24, 24)))
    with pytest.raises(FileExistsError, match="another model"):
        drain(predict_to_zarr(image, tiny_model(3, seed=1), out, tile_shape=(8, 24, 24)))
    result = drain(predict_to_zarr(image, tiny_model(3, seed=1), out, tile_shape=(8, 24, 24),
                                   overwrite=True))
    assert result.tiles_skipped == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a napari-unet output"):
        drain(predict_to_zarr(image, tiny_model(3), tmp_path / "other", overwrite=True))


# --- instances across chunks ----------------------------------------------------------------


def _same_partition(labels: np.ndarray, expected: np.ndarray) -> bool:
    """Same objects, ids aside: a one-to-one map between the nonzero ids."""
    if not np.array_equal(labels > 0, expected > 0):
        return False
    pairs = np.unique(np.stack([labels[labels > 0], expected[expected > 0]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def _balls(shape, centers, radius):
    grid = np.indices(shape)
    mask = np.zeros(shape, dtype=np.float32)
    for center in centers:
        distance = sum((g - c) ** 2 for g, c in zip(grid, center))
        mask[distance <= radius ** 2] = 1
    return mask


def test_objects_straddling_chunk_borders_get_one_id_3d(tmp_path):
    shape = (24, 40, 40)  # tile cores 12 x 20 x 20: the balls sit on faces, edges and corners
    centers = [(12, 20, 20), (6, 10, 20), (12, 6, 30), (18, 30, 8), (5, 33, 33)]
    mask = _balls(shape, centers, 4.5)
    model = mask_model(3)
    result = drain(predict_to_zarr(mask, model, tmp_path / "cc.zarr", output="instances",
                                   method="connected_components", min_overlap=0,
                                   tile_shape=(16, 24, 24)))
    assert result.data.chunks == (12, 20, 20)
    labels = result.data[...]
    expected, n = ndi.label(mask)
    assert result.n_objects == n == len(centers)
    assert _same_partition(labels, expected)

    ws = drain(predict_to_zarr(mask, model, tmp_path / "ws.zarr", output="instances",
                               tile_shape=(16, 24, 24)))
    assert ws.n_objects == len(centers)
    assert _same_partition(ws.data[...], expected)
    assert "_local" not in zarr.open_group(str(tmp_path / "ws.zarr"))


def test_instances_2d_merge_rules_and_min_size(tmp_path):
    # tiles of 24 with halo 2: cores (chunks) of 20 x 20, faces at y = 20 and x = 20
    mask = np.zeros((40, 40), dtype=np.float32)
    mask[5:15, 15:25] = 1      # straddles the x face: one object
    mask[25:28, 18:22] = 1     # 12 voxels split 6 + 6 across the x face: kept by min_size=10
    mask[33:35, 2:4] = 1       # 4 voxels: removed
    mask[12:20, 28:36] = 1     # D, above the y face (8 voxels on it) ...
    mask[20:28, 34:40] = 1     # ... E, below it (6 voxels on it): they touch on 2 voxels only
    model = mask_model(2)
    strict = drain(predict_to_zarr(mask, model, tmp_path / "a.zarr", output="instances",
                                   method="connected_components", min_size=10, min_overlap=0.9,
                                   tile_shape=(24, 24)))
    loose = drain(predict_to_zarr(mask, model, tmp_path / "b.zarr", output="instances",
                                  method="connected_components", min_size=10, min_overlap=0,
                                  tile_shape=(24, 24)))
    assert loose.data.chunks == (20, 20)
    expected, _ = ndi.label(mask)
    small = np.flatnonzero(np.bincount(expected.ravel()) < 10)
    expected[np.isin(expected, small)] = 0
    loose_labels, strict_labels = loose.data[...], strict.data[...]
    assert _same_partition(loose_labels, expected) and loose.n_objects == 3
    assert loose_labels[33, 2] == 0 and loose_labels[26, 18] == loose_labels[26, 21] > 0
    assert len(np.unique(strict_labels[5:15, 15:25])) == 1
    # touching across the face on a sliver (2 of 6 voxels): kept apart when 90% overlap is required
    assert strict.n_objects == 4
    assert strict_labels[15, 30] != strict_labels[25, 38]


def test_semantic_instances_merge_only_within_a_class(tmp_path):
    classes = np.zeros((40, 40), dtype=np.float32)
    classes[5:15, 15:25] = 1   # class 1 across the x face at 20: one object
    classes[22:30, 10:20] = 1  # class 1 left of the face ...
    classes[22:30, 20:28] = 2  # ... touching class 2 right of it: two objects
    model = mask_model(2, semantic=True)
    result = drain(predict_to_zarr(classes, model, tmp_path / "s.zarr", output="instances",
                                   min_overlap=0, tile_shape=(24, 24)))
    expected = drain(segment(classes, model, output="instances", device="cpu")).data
    assert result.n_objects == 3 == expected.max()
    assert _same_partition(result.data[...], expected)
    np.testing.assert_array_equal(result.arrays["labels"][...], classes.astype(np.uint8))


def test_instance_merge_resumes(tmp_path):
    mask = _balls((16, 32, 32), [(8, 16, 16), (4, 4, 4)], 4.5)
    model = mask_model(3)
    out = tmp_path / "out.zarr"
    job = predict_to_zarr(mask, model, out, output="instances", tile_shape=(12, 20, 20))
    for update in job:
        if update.stage == "postprocess" and update.done == 2:
            break
    job.close()
    assert stream_info(out)["state"] in ("merging", "relabeling")
    result = drain(predict_to_zarr(mask, model, out, output="instances", tile_shape=(12, 20, 20)))
    assert result.n_objects == 2 and result.tiles_skipped == result.tiles_total
    assert _same_partition(result.data[...], ndi.label(mask)[0])


# --- command line ---------------------------------------------------------------------------


def test_cli_predict_to_zarr_from_lazy_tiff_and_resume(tmp_path, capsys):
    from napari_unet.cli.main import main
    from napari_unet.io.lazy import open_lazy
    from napari_unet.io.writers import write_image_tiff

    model = tiny_model(3)
    checkpoint = save_checkpoint(model, tmp_path / "tiny.pt")
    image = RNG.integers(0, 4000, size=(16, 40, 40)).astype(np.uint16)
    source = write_image_tiff(tmp_path / "in.tif", image, voxel_size=(2.0, 0.5, 0.5), unit="um")
    out = tmp_path / "out.zarr"
    argv = ["predict", str(source), "-o", str(out), "--model", str(checkpoint), "--device", "cpu",
            "--tile", "16,32,32", "--save-probabilities"]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    expected = reference(image, model)
    group = zarr.open_group(str(out), mode="r")
    assert np.abs(group["probabilities"][...] - expected).max() <= 1e-5
    reopened = open_lazy(out)  # the output opens like any image, calibrated
    assert reopened.voxel_size == pytest.approx((2.0, 0.5, 0.5))
    np.testing.assert_array_equal(reopened.data.compute(), to_semantic(expected, "foreground"))
    assert main(argv) == 0
    assert "resumed" in capsys.readouterr().out
    assert main(["predict", str(source), "-o", str(out), "--model", str(checkpoint),
                 "--device", "cpu", "--tile", "16,32,32", "--output", "instances"]) == 2
    assert "other settings (--output, --save-probabilities differ)" in capsys.readouterr().err


def test_cli_predict_tta_to_zarr(tmp_path, capsys):
    from napari_unet.cli.main import main
    from napari_unet.io.writers import write_image_tiff

    model = tiny_model(3)
    checkpoint = save_checkpoint(model, tmp_path / "tiny.pt")
    image = RNG.integers(0, 4000, size=(6, 36, 36)).astype(np.uint16)
    source = write_image_tiff(tmp_path / "in.tif", image)
    out = tmp_path / "out.zarr"
    argv = ["predict", str(source), "-o", str(out), "--model", str(checkpoint), "--device", "cpu",
            "--precision", "fp32", "--tile", "6,36,32", "--save-probabilities"]
    assert main([*argv, "--tta"]) == 0
    assert "wrote" in capsys.readouterr().out
    probabilities = zarr.open_group(str(out), mode="r")["probabilities"][...]
    assert np.abs(probabilities - _tta_reference(image, model)).max() <= 1e-5
    assert main(argv) == 2  # the same output without --tta: other settings
    assert "other settings" in capsys.readouterr().err


def test_resume_uses_the_stored_plan_with_less_memory_or_another_tile(tmp_path, monkeypatch):
    from napari_unet.bigdata.store import stored_plan
    from napari_unet.engine import planning

    model = tiny_model(3)
    image = RNG.integers(0, 4000, size=(20, 48, 40)).astype(np.uint16)
    expected = reference(image, model)
    out = tmp_path / "out.zarr"
    drain(predict_to_zarr(image, model, out, probabilities=True, tile_shape=(20, 28, 28), max_tiles=3))
    first_plan = stored_plan(zarr.open_group(str(out)))
    # the machine now has much less free memory: a fresh plan would be different
    monkeypatch.setattr(planning, "_available_memory", lambda device: 2**20)
    assert make_plan(image, model, device="cpu").core != first_plan.core
    notes = []
    result = drain(predict_to_zarr(image, model, out, probabilities=True),
                   lambda p: p.message and notes.append(p.message))
    assert result.tiles_skipped == 3 and result.tiles_total == first_plan.n_tiles
    assert stored_plan(zarr.open_group(str(out))) == first_plan
    assert any("read/written" in n for n in notes) and any("resuming" in n for n in notes)
    assert np.abs(result.arrays["probabilities"][...] - expected).max() <= 1e-5


# --- per-tile zoom (object size) --------------------------------------------------------------


@pytest.mark.parametrize("dims", [3, 2])
def test_streamed_zoom_equals_in_memory_zoom(tmp_path, dims):
    model = tiny_model(dims)
    image = RNG.integers(0, 4000, size=(10, 40, 44) if dims == 3 else (3, 50, 44)).astype(np.uint16)
    scale = (1.5, 0.6, 0.8) if dims == 3 else (0.6, 1.4)
    tile = (10, 32, 32) if dims == 3 else (32, 32)
    expected = drain(predict_probabilities(image, model, device="cpu", precision="fp32",
                                           dtype=np.float32, scale=scale))
    assert expected.shape == (1, *image.shape)
    out = tmp_path / "out.zarr"
    options = dict(probabilities=True, precision="fp32", tile_shape=tile, scale=scale)
    drain(predict_to_zarr(image, model, out, max_tiles=2, **options))  # interrupted
    with pytest.raises(FileExistsError, match="other settings"):  # another object size
        drain(predict_to_zarr(image, model, out, **{**options, "scale": (1.0,) * len(scale)}))
    result = drain(predict_to_zarr(image, model, out, **options))
    assert result.tiles_skipped == 2 and result.tiles_total > 3
    assert np.abs(result.arrays["probabilities"][...] - expected).max() <= 1e-5
    np.testing.assert_array_equal(result.data[...], to_semantic(expected, "foreground"))
    settings = stream_info(out)["fingerprint"]["settings"]
    assert settings["object_scale"] == pytest.approx(list(scale)[-dims:])
