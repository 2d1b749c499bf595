"""Instances across chunks: membrane cells and a 2D model's stitched slices match in memory."""

from __future__ import annotations

import dataclasses

import numpy as np

from napari_unet.bigdata.streaming import predict_to_zarr
from napari_unet.engine.predict import segment
from napari_unet.labels.metrics import match_instances
from napari_unet.progress import drain

from .test_streaming import _same_partition, mask_model


def _membrane_model(dims: int):
    """Probability = input, as a membrane model whose cells have radius 10 voxels."""
    model = mask_model(dims)
    return dataclasses.replace(model, task="membranes",
                               object_size={"diameter_um": None, "diameter_voxels": 20.0,
                                            "volume_voxels": 4000.0, "n_objects": 9})


def _cell_walls() -> np.ndarray:
    """3 x 3 columns of cells through a (24, 60, 60) stack; the walls (y, x = 9, 29, 49) sit
    away from the chunk faces (20, 40 in y and x, 12 in z), so every cell is cut by a face."""
    membrane = np.zeros((24, 60, 60), np.float32)
    for wall in (9, 29, 49):
        membrane[:, wall:wall + 2] = 1
        membrane[:, :, wall:wall + 2] = 1
    return membrane


def test_streamed_membrane_cells_equal_the_whole_image():
    membrane = _cell_walls()
    model = _membrane_model(3)
    whole = drain(segment(membrane, model, output="instances", device="cpu", min_size=50)).data
    assert whole.max() == 16  # 4 x 4 cells (the walls cut off the borders)
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        streamed = drain(predict_to_zarr(membrane, model, f"{folder}/m.zarr", output="instances",
                                         min_size=50, tile_shape=(16, 24, 24)))
        assert streamed.data.chunks == (12, 20, 20)
        labels = streamed.data[...]
    assert streamed.n_objects == 16
    match = match_instances(labels, whole)
    assert match.true_positives == 16 and match.f1 == 1.0


def _drifting_disks() -> np.ndarray:
    """20 slices: one disk drifting 1 px per slice, one that jumps at z=10."""
    yy, xx = np.indices((40, 48))
    stack = np.zeros((20, 40, 48), np.float32)
    for z in range(20):
        stack[z][(yy - 10) ** 2 + (xx - 8 - z) ** 2 <= 25] = 1
        stack[z][(yy - 30) ** 2 + (xx - (10 if z < 10 else 38)) ** 2 <= 25] = 1
    return stack


def test_a_2d_model_on_a_stack_stitches_slices_in_memory_and_streamed(tmp_path):
    stack = _drifting_disks()
    model = mask_model(2)
    whole = drain(segment(stack, model, output="instances", device="cpu", min_size=5)).data
    assert whole.max() == 3  # the drifting disk, and the jumping one before and after
    assert len({int(whole[z, 10, 8 + z]) for z in range(20)}) == 1
    assert whole[9, 30, 10] != whole[10, 30, 38]
    for label in range(1, int(whole.max()) + 1):  # no object spans slices that don't overlap
        zs = np.flatnonzero((whole == label).any(axis=(1, 2)))
        assert all(np.any((whole[z] == label) & (whole[z + 1] == label)) for z in zs[:-1])
    per_slice = drain(segment(stack, model, output="instances", device="cpu", min_size=5,
                              stitch_threshold=0)).data
    assert per_slice.max() == 40
    streamed = drain(predict_to_zarr(stack, model, tmp_path / "s.zarr", output="instances",
                                     min_size=5, tile_shape=(24, 28)))
    assert _same_partition(streamed.data[...], whole)
    apart = drain(predict_to_zarr(stack, model, tmp_path / "p.zarr", output="instances",
                                  min_size=5, tile_shape=(24, 28), stitch_threshold=0))
    assert _same_partition(apart.data[...], per_slice)


def test_face_pairs_by_iou_for_stitched_slices():
    from napari_unet.bigdata.merge import _face_pairs

    low = np.zeros((10, 10), np.int64)
    high = np.zeros((10, 10), np.int64)
    low[0:4, 0:4] = 1       # 16 px, overlaps 2 by 12 px: IoU 12 / 20
    high[1:4, 0:4] = 2      # 12 px
    low[6:10, 6:10] = 3     # 16 px, overlaps 4 by 3 px: IoU 3 / 16
    high[6, 6:9] = 4
    high[8:10, 0:4] = 5     # touches nothing
    pairs = _face_pairs(low, high, 0.5, min_iou=0.25)
    assert pairs.tolist() == [[1, 2]]
    assert _face_pairs(low, high, 0.5, min_iou=0.1).tolist() == [[1, 2], [3, 4]]
    assert len(_face_pairs(low, high, 0.5, min_iou=0)) == 0  # per slice: nothing joins in z
    assert _face_pairs(low, high, 0.5).tolist() == [[1, 2], [3, 4]]  # contact rule
