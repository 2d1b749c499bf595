"""Labels export: modes, the summary line, written files equal to the array, copy steps."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unet.io.label_export import (
    MODES,
    copy_steps,
    export_labels,
    labels_for_export,
    probabilities_for_export,
    summary_line,
)
from napari_unet.io.readers import read_image
from napari_unet.labels import edits, statistics
from napari_unet.progress import drain


def _labels() -> np.ndarray:
    labels = np.zeros((4, 16, 16), np.uint16)
    labels[:, 2:6, 2:6] = 1
    labels[:, 9:13, 9:13] = 2
    return labels


def test_modes():
    labels = _labels()
    assert labels_for_export(labels, MODES[0]) is not None
    np.testing.assert_array_equal(labels_for_export(labels, "as in the layer"), labels)
    np.testing.assert_array_equal(labels_for_export(labels, "binary"), (labels > 0).astype(np.uint8))
    np.testing.assert_array_equal(labels_for_export(labels, "instances"), labels)
    mask = (labels > 0).astype(np.uint8)
    np.testing.assert_array_equal(labels_for_export(mask, "instances"),
                                  edits.binary_to_instances(mask > 0))
    with pytest.raises(ValueError, match="unknown export mode"):
        labels_for_export(labels, "png")


def test_summary_line():
    labels = _labels()
    stats = statistics.label_statistics(labels, (2.0, 0.5, 0.5))
    line = summary_line(labels, (2.0, 0.5, 0.5), "um")
    assert line.startswith(f"{stats['objects']} objects, {stats['voxels']} voxels")
    assert "um³" in line and "um²" in summary_line(labels[0], (0.5, 0.5), "um")


def test_probabilities_for_export():
    probs, axes = probabilities_for_export(np.full((1, 4, 8, 8), 0.5, np.float16), 3)
    assert probs.shape == (4, 8, 8) and probs.dtype == np.float32 and axes == "ZYX"
    probs, axes = probabilities_for_export(np.zeros((2, 8, 8), np.float32), 2)
    assert probs.shape == (2, 8, 8) and axes == "CYX"
    probs, _ = probabilities_for_export(np.full((1, 8, 8), 255, np.uint8), 2)
    assert probs.dtype == np.float32 and np.allclose(probs, 1.0)  # 0..255 → 0..1


def test_export_labels_writes_labels_and_probabilities(tmp_path):
    labels = _labels()
    probs = np.random.default_rng(0).random((1, *labels.shape)).astype(np.float32)
    written, summary = export_labels(tmp_path / "out.tif", labels, mode="as in the layer",
                                     voxel_size=(2.0, 0.5, 0.5), unit="um", probabilities=probs)
    assert [p.name for p in written] == ["out.tif", "out_probabilities.tif"]
    back = read_image(written[0])
    np.testing.assert_array_equal(back.data, labels)
    assert back.voxel_size == pytest.approx((2.0, 0.5, 0.5)) and back.unit == "um"
    np.testing.assert_allclose(read_image(written[1]).data, probs[0])
    assert summary == summary_line(labels, (2.0, 0.5, 0.5), "um")
    with pytest.raises(ValueError, match=r"\.tif"):
        export_labels(tmp_path / "out.png", labels, mode="binary", voxel_size=(1, 1, 1), unit="um")


def test_copy_steps():
    data = _labels().astype(np.uint32)
    steps = []
    copy = drain(copy_steps(data, 16 * 16 * 4 * 2), lambda _: steps.append(1))  # 2 slices a step
    assert len(steps) == 2 and not np.shares_memory(copy, data)
    np.testing.assert_array_equal(copy, data)
    empty = drain(copy_steps(np.zeros((0, 3), np.uint8)))
    assert empty.shape == (0, 3)
    scalar = drain(copy_steps(np.array(5, np.uint8)))
    assert scalar == 5
