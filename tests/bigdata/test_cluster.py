"""The engine on a real dask LocalCluster (2 worker processes): map_overlap, tile tasks, batch."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import zarr
from scipy import ndimage as ndi

from napari_unet.bigdata import cluster
from napari_unet.bigdata.streaming import predict_to_zarr
from napari_unet.engine.predict import predict_probabilities, segment
from napari_unet.io.readers import read_image
from napari_unet.io.writers import write_image_tiff
from napari_unet.labels.instances import to_semantic
from napari_unet.model.checkpoint import save_checkpoint
from napari_unet.progress import drain

from .test_streaming import _balls, _same_partition, mask_model, tiny_model

RNG = np.random.default_rng(3)


@pytest.fixture(scope="module")
def client():
    with cluster.dask_client(n_workers=2, threads_per_worker=1, memory_limit="2GiB") as client:
        yield client


def _reference(image, model):
    return drain(predict_probabilities(image, model, device="cpu", dtype=np.float32))


def _cached_models(client) -> dict:
    return client.run(lambda: sum(kind == "model" for kind, _ in cluster._CACHE))


def test_map_overlap_equals_in_memory(client):
    model = tiny_model(3)
    image = RNG.integers(0, 4000, size=(20, 44, 36)).astype(np.uint16)
    expected = _reference(image, model)
    lazy = da.from_array(image, chunks=(9, 17, 20))  # any input chunks: rechunked to tile cores
    probabilities = cluster.predict_dask(lazy, model, tile_shape=(20, 32, 28), client=client)
    assert len(probabilities.chunks[2]) > 1 and len(probabilities.chunks[3]) > 1
    assert all(c % 2 == 0 for c in probabilities.chunks[2][:-1])  # on the pooling grid
    result = probabilities.compute()
    assert result.dtype == np.float32 and np.abs(result - expected).max() <= 1e-5
    labels = cluster.predict_dask(lazy, model, output="labels", tile_shape=(20, 32, 28)).compute()
    np.testing.assert_array_equal(labels, to_semantic(expected, "foreground"))


def test_tile_tasks_from_a_path_with_resume_and_weights_sent_once(client, tmp_path):
    model = tiny_model(3)
    image = RNG.integers(0, 4000, size=(16, 48, 40)).astype(np.uint16)
    source = tmp_path / "in.zarr"
    zarr.create_array(str(source), shape=image.shape, chunks=(8, 16, 16), dtype=image.dtype)[...] = image
    out = tmp_path / "out.zarr"
    # an interrupted local run: 3 tiles done
    drain(predict_to_zarr(image, model, out, probabilities=True, tile_shape=(16, 28, 28), max_tiles=3))
    result = drain(cluster.predict_to_zarr_distributed(client, str(source), model, out,
                                                       probabilities=True, tile_shape=(16, 28, 28)))
    assert result.tiles_skipped == 3 and result.tiles_total > 6
    expected = _reference(image, model)
    assert np.abs(result.arrays["probabilities"][...] - expected).max() <= 1e-5
    np.testing.assert_array_equal(result.data[...], to_semantic(expected, "foreground"))
    # weights arrived once per worker and every worker built the network once
    assert all(count <= 1 for count in _cached_models(client).values())


def _tta_reference(image, model):
    return drain(predict_probabilities(image, model, device="cpu", precision="fp32", tta=True,
                                       dtype=np.float32))


def test_tta_on_dask_blocks_and_tile_tasks_equals_in_memory_tta(client, tmp_path):
    model = tiny_model(3)
    image = RNG.integers(0, 4000, size=(6, 38, 36)).astype(np.uint16)
    expected = _tta_reference(image, model)
    plain = _reference(image, model)
    assert np.abs(expected - plain).max() > 1e-3
    lazy = da.from_array(image, chunks=(6, 19, 18))
    probabilities = cluster.predict_dask(lazy, model, tile_shape=(6, 32, 32), precision="fp32",
                                         tta=True, client=client)
    assert len(probabilities.chunks[2]) > 1 and len(probabilities.chunks[3]) > 1
    assert np.abs(probabilities.compute() - expected).max() <= 1e-5
    # tile tasks: the workers take TTA from the stored settings of an interrupted local run
    out = tmp_path / "out.zarr"
    options = dict(probabilities=True, precision="fp32", tile_shape=(6, 32, 32), tta=True)
    drain(predict_to_zarr(image, model, out, max_tiles=2, **options))
    result = drain(cluster.predict_to_zarr_distributed(client, image, model, out, **options))
    assert result.tiles_skipped == 2 and result.tiles_total > 4
    assert np.abs(result.arrays["probabilities"][...] - expected).max() <= 1e-5
    with pytest.raises(FileExistsError, match="other settings"):
        drain(cluster.predict_to_zarr_distributed(client, image, model, out,
                                                  **{**options, "tta": False}))


def test_batch_with_tta_equals_in_memory_tta(tmp_path):
    model = tiny_model(2)
    folder = tmp_path / "images"
    folder.mkdir()
    image = RNG.integers(0, 255, size=(40, 36)).astype(np.uint8)
    write_image_tiff(folder / "a.tif", image)
    expected = _tta_reference(image, model)
    for suffix in (".tif", ".zarr"):
        written = drain(cluster.predict_batch([folder / "a.tif"], model, tmp_path / suffix[1:],
                                              suffix=suffix, output="probabilities", device="cpu",
                                              precision="fp32", tta=True))
        data = read_image(written[0]).data if suffix == ".tif" else \
            zarr.open_group(str(written[0]), mode="r")["probabilities"][...]
        assert np.abs(np.asarray(data, np.float32).reshape(expected.shape) - expected).max() <= 1e-5


def test_instances_on_the_cluster_are_consistent_across_chunks(client, tmp_path):
    mask = _balls((20, 40, 40), [(10, 20, 20), (4, 6, 20), (15, 32, 7)], 4.5)
    result = drain(cluster.predict_to_zarr_distributed(client, mask, mask_model(3), tmp_path / "i.zarr",
                                                       output="instances", tile_shape=(14, 24, 24)))
    assert result.n_objects == 3
    assert _same_partition(result.data[...], ndi.label(mask)[0])


def test_instances_on_the_cluster_into_ome_zarr(client, tmp_path):
    pytest.importorskip("ome_zarr")
    from napari_unet.io.omezarr import read_ome_zarr

    mask = _balls((20, 40, 40), [(10, 20, 20), (4, 6, 20), (15, 32, 7)], 4.5)
    source = write_image_tiff(tmp_path / "mask.tif", mask, voxel_size=(2.0, 0.5, 0.5), unit="um")
    out = tmp_path / "i.ome.zarr"
    result = drain(cluster.predict_to_zarr_distributed(
        client, str(source), mask_model(3), out, output="instances", tile_shape=(14, 24, 24),
        voxel_size=(2.0, 0.5, 0.5), unit="um"))
    assert result.n_objects == 3
    image, labels = read_ome_zarr(out)
    np.testing.assert_array_equal(np.asarray(image.levels[0]), mask)
    assert image.scale == labels[0].scale == (2.0, 0.5, 0.5)
    assert _same_partition(np.asarray(labels[0].levels[0]), ndi.label(mask)[0])


def test_batch_folder_one_task_per_file_and_cli(client, tmp_path, capsys):
    from napari_unet.cli.main import main

    model = tiny_model(2)
    folder = tmp_path / "images"
    folder.mkdir()
    images = [RNG.integers(0, 255, size=(40 + 8 * i, 48)).astype(np.uint8) for i in range(3)]
    for i, image in enumerate(images):
        write_image_tiff(folder / f"img{i}.tif", image, voxel_size=(0.5, 0.5), unit="um")
    written = drain(cluster.predict_batch(sorted(folder.iterdir()), model, tmp_path / "api",
                                          client=client, output="labels", device="cpu"))
    assert [p.name for p in written] == ["img0.tif", "img1.tif", "img2.tif"]
    for image, path in zip(images, written):
        expected = drain(segment(image, model, output="labels", device="cpu", dtype=np.float32)).data
        result = read_image(path)
        np.testing.assert_array_equal(result.data, expected)
        assert result.voxel_size == pytest.approx((0.5, 0.5))

    checkpoint = save_checkpoint(model, tmp_path / "m.pt")
    address = client.scheduler.address  # any running scheduler, as with dask-jobqueue
    argv = ["predict", str(folder), "-o", str(tmp_path / "cli"), "--model", str(checkpoint),
            "--device", "cpu", "--dask", address]
    assert main(argv) == 0
    assert "wrote 3 files" in capsys.readouterr().out
    for path in written:
        np.testing.assert_array_equal(read_image(tmp_path / "cli" / path.name).data, read_image(path).data)


def test_cli_dask_single_image_needs_zarr_output(client, tmp_path, capsys):
    from napari_unet.cli.main import main

    model = tiny_model(3)
    checkpoint = save_checkpoint(model, tmp_path / "m.pt")
    image = RNG.integers(0, 4000, size=(12, 40, 32)).astype(np.uint16)
    source = write_image_tiff(tmp_path / "in.tif", image)
    address = client.scheduler.address
    assert main(["predict", str(source), "-o", str(tmp_path / "o.tif"), "--model", str(checkpoint),
                 "--dask", address]) == 2
    assert ".zarr output" in capsys.readouterr().err
    assert main(["predict", str(source), "-o", str(tmp_path / "o.zarr"), "--model", str(checkpoint),
                 "--device", "cpu", "--tile", "12,24,24", "--save-probabilities", "--dask", address]) == 0
    group = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")
    assert np.abs(group["probabilities"][...] - _reference(image, model)).max() <= 1e-5


def test_zoomed_dask_blocks_equal_in_memory():
    model = tiny_model(3)
    image = RNG.integers(0, 4000, size=(12, 60, 52)).astype(np.uint16)
    scale = (1.3, 0.55, 0.7)
    expected = drain(predict_probabilities(image, model, device="cpu", precision="fp32",
                                           dtype=np.float32, scale=scale))
    lazy = da.from_array(image, chunks=(12, 30, 26))
    probabilities = cluster.predict_dask(lazy, model, tile_shape=(12, 24, 24), precision="fp32",
                                         scale=scale)
    assert len(probabilities.chunks[2]) > 1 and len(probabilities.chunks[3]) > 1
    assert probabilities.shape == (1, *image.shape)
    assert np.abs(probabilities.compute(scheduler="synchronous") - expected).max() <= 1e-5
