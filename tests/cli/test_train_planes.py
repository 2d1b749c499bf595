"""``napari-unet train --slices`` with slices along z, y and x."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import tifffile

from napari_unet.cli.main import main
from napari_unet.cli.train import _parse_planes
from napari_unet.model.checkpoint import load_checkpoint

TINY = ["--base-channels", "4", "--depth", "2", "--iterations", "2", "--batch-size", "2"]


def test_parse_planes():
    assert _parse_planes("3,17") == [3, 17]
    assert _parse_planes("1,3-4") == [1, 3, 4]
    assert _parse_planes("z:3,y:40,x:12") == [3, (1, 40), (2, 12)]
    assert _parse_planes("Y:40-42, z:5") == [5, (1, 40), (1, 41), (1, 42)]
    for bad, message in [("w:3", "unknown axis 'w'"), ("y:", "expected slices"),
                         ("y:a", "expected slices"), ("", "expected slices"),
                         ("y:-3", "start at 0")]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            _parse_planes(bad)


@pytest.fixture
def stack(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.zeros((8, 32, 32), np.uint16)
    labels[:, 4:12, 4:12] = 1
    labels[:, 16:26, 10:20] = 2
    image = ((labels > 0) * 100 + rng.normal(10, 3, labels.shape)).astype(np.float32)
    paths = {"image": tmp_path / "stack.tif", "labels": tmp_path / "stack_labels.tif"}
    tifffile.imwrite(paths["image"], image)
    tifffile.imwrite(paths["labels"], labels)
    return paths


def train(capsys, stack, tmp_path, slices):
    out = tmp_path / "m.pt"
    code = main(["train", "--image", str(stack["image"]), "--labels", str(stack["labels"]),
                 "--dims", "3", *TINY, "--slices", slices, "-o", str(out)])
    _, err = capsys.readouterr()
    return code, err, out


def test_train_on_slices_in_any_plane(capsys, stack, tmp_path):
    code, err, out = train(capsys, stack, tmp_path, "z:3,y:20,x:12")
    assert code == 0, err
    info = load_checkpoint(out).history[-1]["data"]["images"][0]
    assert info["slices"] == [3, [1, 20], [2, 12]]
    assert info["annotated_voxels"] == 32 * 32 + 8 * 32 + 8 * 32 - 32 - 32 - 8 + 1


@pytest.mark.parametrize("slices,message", [("y:40", "y 40 is outside the stack"),
                                            ("x:3,z:8", r"slices \[8\] outside"),
                                            ("q:1", "unknown axis 'q'")])
def test_bad_slices_are_one_line_errors(capsys, stack, tmp_path, slices, message):
    code, err, out = train(capsys, stack, tmp_path, slices)
    assert code == 2 and not out.exists()
    assert len(err.strip().splitlines()) == 1
    assert pytest.importorskip("re").search(message, err), err
