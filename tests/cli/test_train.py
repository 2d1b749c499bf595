"""Tests for ``napari-unet train`` and ``napari-unet eval`` (tiny networks, a few iterations)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_unet.cli.main import main
from napari_unet.model.checkpoint import load_checkpoint

TINY = ["--base-channels", "4", "--depth", "2", "--iterations", "2", "--batch-size", "2"]


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.zeros((6, 32, 32), np.uint16)
    labels[:, 4:12, 4:12] = 1
    labels[:, 16:26, 10:20] = 2
    image = ((labels > 0) * 100 + rng.normal(10, 3, labels.shape)).astype(np.float32)
    paths = {}
    for name, array in {"stack": image, "stack_labels": labels, "image": image[0],
                        "labels": labels[0], "empty": np.zeros_like(labels[0]),
                        "float_labels": labels[0] * 0.5, "mask": (labels[0] * 0).astype(np.uint8)}.items():
        paths[name] = tmp_path / f"{name}.tif"
        tifffile.imwrite(paths[name], array)
    return paths


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_from_scratch_then_fine_tune_on_slices(data, tmp_path, capsys):
    first = tmp_path / "first.pt"
    code, out, _ = run(capsys, "train", "--image", data["image"], "--labels", data["labels"], "--dims", "2",
                       "--task", "foreground_boundary", *TINY, "--description", "test model", "-o", first)
    assert code == 0 and "wrote" in out
    model = load_checkpoint(first)
    assert model.version == 1 and model.task == "foreground_boundary" and model.description == "test model"
    assert model.name == "first"

    second = tmp_path / "second.pt"
    code, out, _ = run(capsys, "train", "--image", data["stack"], "--labels", data["stack_labels"],
                       "--slices", "1,3-4", "--from", first, "--iterations", "2", "--half", "-o", second)
    assert code == 0
    child = load_checkpoint(second)
    assert child.version == 2 and "first v1" in child.parent
    assert child.history[-1]["data"]["images"][0]["slices"] == [1, 3, 4]
    assert load_checkpoint(first).version == 1


def test_train_3d_with_a_folder_of_pairs(data, tmp_path, capsys):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    for i in range(2):
        (images / f"s{i}.tif").write_bytes(data["stack"].read_bytes())
        (labels / f"s{i}.tif").write_bytes(data["stack_labels"].read_bytes())
    out_path = tmp_path / "m3.pt"
    code, _, _ = run(capsys, "train", "--image", images, "--labels", labels, "--dims", "3", "--task",
                     "foreground", *TINY, "-o", out_path)
    assert code == 0
    model = load_checkpoint(out_path)
    assert model.spatial_dims == 3 and model.history[-1]["data"]["pairs"] == 2


@pytest.mark.parametrize("case,message", [
    ("count", "--labels"),
    ("shape", "shape"),
    ("empty", "empty"),
    ("float", "integers"),
    ("mask", "nothing"),
    ("same", "overwrite"),
    ("suffix", ".pt"),
    ("slices2d", "stacks"),
])
def test_bad_input_is_one_line_and_exit_2(data, tmp_path, capsys, case, message):
    out = tmp_path / "m.pt"
    base = ["train", "--dims", "2", *TINY]
    args = {
        "count": base + ["--image", data["image"], "--image", data["image"], "--labels", data["labels"], "-o", out],
        "shape": base + ["--image", data["stack"], "--labels", data["labels"], "-o", out],
        "empty": base + ["--image", data["image"], "--labels", data["empty"], "-o", out],
        "float": base + ["--image", data["image"], "--labels", data["float_labels"], "-o", out],
        "mask": base + ["--image", data["image"], "--labels", data["labels"], "--mask", data["mask"], "-o", out],
        "same": ["train", "--image", data["image"], "--labels", data["labels"], "--from", out, "-o", out],
        "suffix": base + ["--image", data["image"], "--labels", data["labels"], "-o", tmp_path / "m.tif"],
        "slices2d": base + ["--image", data["image"], "--labels", data["labels"], "--slices", "1", "-o", out],
    }[case]
    code, _, err = run(capsys, *args)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("napari-unet: error:") and message in lines[0]
    assert not out.exists()


def test_eval_prints_scores(data, tmp_path, capsys):
    code, out, _ = run(capsys, "eval", data["labels"], data["labels"])
    assert code == 0
    assert out.startswith("dice=1.000 iou=1.000 precision=1.000 recall=1.000 f1=1.000")
    code, out, _ = run(capsys, "eval", data["stack_labels"], data["stack_labels"], "--slices", "0-2")
    assert code == 0 and "n_gt=2" in out
    code, _, err = run(capsys, "eval", data["labels"], data["stack_labels"])
    assert code == 2 and "differs" in err


def test_train_keeps_post_processing_of_too_few_held_out_objects(data, tmp_path, capsys):
    # six annotated slices with 2 objects each: one slice is held out, too few objects to tune on
    out_path = tmp_path / "kept.pt"
    code, out, _ = run(capsys, "train", "--image", data["stack"], "--labels", data["stack_labels"],
                       "--dims", "2", "--task", "foreground_boundary", *TINY, "-o", out_path)
    assert code == 0 and "post-processing: the start model's values (the held-out part is one image" in out
    assert load_checkpoint(out_path).postprocess == {}


def test_train_tunes_and_stores_post_processing(tmp_path, capsys):
    # 2D images with 36 objects each: two held-out images have enough objects to tune on
    rng = np.random.default_rng(1)
    labels = np.zeros((5, 96, 96), np.uint16)
    for i in range(6):
        for j in range(6):
            labels[:, 4 + 16 * i:12 + 16 * i, 4 + 16 * j:12 + 16 * j] = 1 + 6 * i + j
    image = ((labels > 0) * 100 + rng.normal(10, 3, labels.shape)).astype(np.float32)
    data = {"stack": tmp_path / "many.tif", "stack_labels": tmp_path / "many_labels.tif"}
    tifffile.imwrite(data["stack"], image)
    tifffile.imwrite(data["stack_labels"], labels)
    out_path = tmp_path / "tuned.pt"
    code, out, _ = run(capsys, "train", "--image", data["stack"], "--labels", data["stack_labels"],
                       "--dims", "2", "--task", "foreground_boundary", *TINY, "--validation-fraction", "0.4",
                       "-o", out_path)
    assert code == 0 and "post-processing re-tuned on 72 held-out objects" in out
    tuned = load_checkpoint(out_path).postprocess
    assert {"threshold", "min_size", "tuned_on", "score"} <= set(tuned)
    plain = tmp_path / "plain.pt"
    code, out, _ = run(capsys, "train", "--image", data["stack"], "--labels", data["stack_labels"],
                       "--dims", "2", "--task", "foreground_boundary", *TINY, "--no-tune", "-o", plain)
    assert code == 0 and "tuned" not in out
    assert load_checkpoint(plain).postprocess == {}


def test_train_with_the_robust_augmentation_preset(data, tmp_path, capsys):
    out_path = tmp_path / "robust.pt"
    code, out, _ = run(capsys, "train", "--image", data["image"], "--labels", data["labels"], "--dims", "2",
                       *TINY, "--augment", "robust", "-o", out_path)
    assert code == 0 and "wrote" in out
    assert load_checkpoint(out_path).history[-1]["augment_preset"] == "robust"
    plain = tmp_path / "plain.pt"
    assert run(capsys, "train", "--image", data["image"], "--labels", data["labels"], "--dims", "2",
               *TINY, "-o", plain)[0] == 0
    assert load_checkpoint(plain).history[-1]["augment_preset"] == "default"
