"""Bad input and faults on the command line (issue 14): each case ends with a one-line message
and a meaningful exit code, never a traceback, and training is never lost."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_unet.cli.main import main
from napari_unet.io import writers
from napari_unet.io.readers import read_image
from napari_unet.model.checkpoint import (
    list_pretrained,
    load_checkpoint,
    save_checkpoint,
)

from ..conftest import SAMPLE_DATA, tiny_model

TINY = ["--base-channels", "4", "--depth", "2", "--batch-size", "2", "--device", "cpu"]


def run(capsys, *args) -> tuple[int, str, str]:
    """``main(args)`` and its stdout, stderr."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    """The only non-empty stderr line (fails when there are several, or a traceback)."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def model_file(tmp_path) -> Path:
    return save_checkpoint(tiny_model(2, depth=2, base=2), tmp_path / "tiny.pt")


@pytest.fixture
def image_file(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "image.tif"
    tifffile.imwrite(path, (rng.random((32, 32)) * 1000).astype(np.uint16))
    return path


@pytest.fixture
def train_data(tmp_path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    labels = np.zeros((32, 32), np.uint16)
    labels[4:12, 4:12] = 1
    labels[16:26, 10:20] = 2
    image = ((labels > 0) * 100 + rng.normal(10, 3, labels.shape)).astype(np.float32)
    paths = {"image": tmp_path / "train_image.tif", "labels": tmp_path / "train_labels.tif"}
    tifffile.imwrite(paths["image"], image)
    tifffile.imwrite(paths["labels"], labels)
    return paths


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- 1. shipped models are never overwritten --------------------------------------------------


def test_train_refuses_to_overwrite_a_shipped_model_that_is_not_the_parent(capsys):
    shipped = list_pretrained()
    target = shipped["cells-3d"]
    before = digest(target)
    code, _, err = run(capsys, "train", "--image", SAMPLE_DATA / "nuclei_3d.tif", "--labels",
                       SAMPLE_DATA / "nuclei_3d_labels.tif", "--slices", "3,17", "--from", "nuclei-3d",
                       "--time-limit", "2", "-o", target)
    assert code == 2
    line = one_line(err)
    assert line.startswith("napari-unet: error: refusing to write") and "shipped" in line
    assert digest(target) == before


def test_train_refuses_a_new_file_in_the_shipped_folder_and_aliases_of_it(tmp_path, capsys, train_data):
    shipped = list_pretrained()
    folder = next(iter(shipped.values())).parent
    link = tmp_path / "models_link"
    link.symlink_to(folder, target_is_directory=True)
    alias = tmp_path / "alias.pt"
    alias.symlink_to(shipped["nuclei-2d"])
    before = digest(shipped["nuclei-2d"])
    for output in (folder / "mine.pt", link / "mine.pt", alias):
        code, _, err = run(capsys, "train", "--image", train_data["image"], "--labels",
                           train_data["labels"], "--dims", "2", *TINY, "--iterations", "1", "-o", output)
        assert code == 2 and "shipped" in one_line(err)
    assert not (folder / "mine.pt").exists()
    assert digest(shipped["nuclei-2d"]) == before


# --- 2. NaN voxels, constant and all-NaN images -----------------------------------------------


def test_one_nan_pixel_does_not_wipe_the_result(tmp_path, capsys):
    clean = tifffile.imread(SAMPLE_DATA / "nuclei_2d.tif").astype(np.float32)
    nan = clean.copy()
    nan[10, 10] = np.nan
    tifffile.imwrite(tmp_path / "clean.tif", clean)
    tifffile.imwrite(tmp_path / "nan.tif", nan)
    counts = []
    for name in ("clean", "nan"):
        code, _, err = run(capsys, "predict", tmp_path / f"{name}.tif", "-o", tmp_path / f"{name}_out.tif",
                           "--model", "nuclei-2d", "--output", "instances", "--device", "cpu")
        assert code == 0
        counts.append(int(read_image(tmp_path / f"{name}_out.tif").data.max()))
        if name == "nan":
            assert one_line(err) == ("napari-unet: warning: 1 of 361920 voxels is NaN or infinite; "
                                     "treated as background")
            assert read_image(tmp_path / "nan_out.tif").data[10, 10] == 0
    assert counts[0] > 50
    assert abs(counts[1] - counts[0]) <= 2


@pytest.mark.parametrize("values,message", [
    (np.full((32, 32), np.nan, np.float32), "no finite values"),
    (np.full((32, 32), 7, np.uint16), "the image is constant (every voxel is 7)"),
])
def test_all_nan_or_constant_image_is_a_clear_error(tmp_path, capsys, model_file, values, message):
    path = tmp_path / "bad.tif"
    tifffile.imwrite(path, values)
    code, _, err = run(capsys, "predict", path, "-o", tmp_path / "o.tif", "--model", model_file,
                       "--device", "cpu")
    assert code == 2 and message in one_line(err)
    assert not (tmp_path / "o.tif").exists()


# --- 3. training output checked before training, fallback when the final write fails ----------


def test_train_output_that_is_a_folder_is_refused_before_training(tmp_path, capsys, train_data, monkeypatch):
    from napari_unet.training import trainer

    def never(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(trainer.Trainer, "run", never)
    folder = tmp_path / "existing.pt"
    folder.mkdir()
    code, _, err = run(capsys, "train", "--image", train_data["image"], "--labels", train_data["labels"],
                       "--dims", "2", *TINY, "--iterations", "1", "-o", folder)
    assert code == 2
    assert one_line(err) == f"napari-unet: error: cannot write {folder}: it is a folder; give a file name"


def test_train_output_under_a_file_is_refused_before_training(tmp_path, capsys, train_data):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(capsys, "train", "--image", train_data["image"], "--labels", train_data["labels"],
                       "--dims", "2", *TINY, "--iterations", "1", "-o", blocker / "m.pt")
    assert code == 2 and one_line(err).endswith(f"{blocker} is a file, not a folder")


def _fail_writes_in(monkeypatch, folder: Path, code: int = errno.ENOSPC) -> None:
    """``torch.save`` raises ``OSError(code)`` for files in ``folder`` (a full disk there)."""
    import torch

    real_save = torch.save

    def save(obj, handle, *args, **kwargs):
        name = getattr(handle, "name", handle)
        if isinstance(name, (str, os.PathLike)) and Path(name).parent == folder:
            handle.write(b"partial")
            raise OSError(code, os.strerror(code))
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_train_saves_to_the_cache_when_the_disk_is_full(tmp_path, capsys, train_data, monkeypatch):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    _fail_writes_in(monkeypatch, out_dir)
    target = out_dir / "m.pt"
    code, out, err = run(capsys, "train", "--image", train_data["image"], "--labels", train_data["labels"],
                         "--dims", "2", *TINY, "--iterations", "2", "-o", target)
    assert code == 1
    line = one_line(err)
    saved = list((cache / "napari-unet").glob("m-recovered-*.pt"))
    assert len(saved) == 1
    assert line == (f"napari-unet: error: cannot write {target}: No space left on device; "
                    f"the trained model was saved to {saved[0]} instead")
    assert load_checkpoint(saved[0]).history[-1]["iterations"] == 2
    assert f"wrote {saved[0]}" in out
    assert sorted(p.name for p in out_dir.iterdir()) == []  # no partial or temporary file


def test_train_saves_next_to_the_output_when_only_that_file_fails(tmp_path, capsys, train_data, monkeypatch):
    from napari_unet.io import files
    from napari_unet.model import checkpoint

    target = tmp_path / "m.pt"
    real = files.atomic_write

    def atomic_write(path, write):
        if Path(path) == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, write)

    monkeypatch.setattr(checkpoint, "atomic_write", atomic_write)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    code, _, err = run(capsys, "train", "--image", train_data["image"], "--labels", train_data["labels"],
                       "--dims", "2", *TINY, "--iterations", "1", "-o", target)
    assert code == 1
    saved = list(tmp_path.glob("m-recovered-*.pt"))
    assert len(saved) == 1 and load_checkpoint(saved[0]).spatial_dims == 2
    assert one_line(err) == (f"napari-unet: error: cannot write {target}: Permission denied; "
                             f"the trained model was saved to {saved[0]} instead")


# --- 4. file-system errors of predict ---------------------------------------------------------


@pytest.mark.parametrize("suffix,case", [
    (".tif", "folder"), (".tif", "parent_is_file"), (".tif", "missing_parent"),
    (".zarr", "file_of_that_name"), (".zarr", "parent_is_file"),
])
def test_predict_output_location_is_checked_before_inference(tmp_path, capsys, model_file, image_file,
                                                              monkeypatch, suffix, case):
    from napari_unet.bigdata import streaming as streaming_streaming
    from napari_unet.engine import predict

    def never(*args, **kwargs):
        raise AssertionError("inference started")

    monkeypatch.setattr(predict, "segment", never)
    monkeypatch.setattr(streaming_streaming, "predict_to_zarr", never)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    output = {"folder": tmp_path / "existing.tif", "parent_is_file": blocker / f"o{suffix}",
              "missing_parent": tmp_path / "nodir" / "x.tif",
              "file_of_that_name": tmp_path / "o.zarr"}[case]
    if case == "folder":
        output.mkdir()
    if case == "file_of_that_name":
        output.write_text("not a zarr store")
    code, _, err = run(capsys, "predict", image_file, "-o", output, "--model", model_file, "--device", "cpu")
    assert code == 2
    expected = {"folder": "it is a folder; give a file name",
                "parent_is_file": f"{blocker} is a file, not a folder",
                "missing_parent": f"the folder {output.parent} does not exist",
                "file_of_that_name": "a file of that name exists (expected a folder)"}[case]
    assert one_line(err) == f"napari-unet: error: cannot write {output}: {expected}"


def test_predict_tif_disk_full_names_the_users_file(tmp_path, capsys, model_file, image_file, monkeypatch):
    pass

    def full(file, *args, **kwargs):
        Path(file).write_bytes(b"II*\x00")
        raise OSError(errno.ENOSPC, "No space left on device", str(file))

    monkeypatch.setattr(writers.tifffile, "imwrite", full)
    output = tmp_path / "labels.tif"
    code, _, err = run(capsys, "predict", image_file, "-o", output, "--model", model_file, "--device", "cpu")
    assert code == 1
    assert one_line(err) == f"napari-unet: error: cannot write {output}: No space left on device"
    assert list(tmp_path.glob(".labels.*")) == [] and not output.exists()


def test_predict_zarr_disk_full_is_one_line(tmp_path, capsys, model_file, image_file, monkeypatch):
    from zarr.storage import LocalStore

    real_set = LocalStore.set

    async def full(self, key, value):
        if key.endswith("zarr.json") or key.endswith(".zattrs") or key.endswith(".zarray"):
            return await real_set(self, key, value)  # metadata fits; chunks do not
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(self.root) / key))

    monkeypatch.setattr(LocalStore, "set", full)
    output = tmp_path / "out.zarr"
    code, _, err = run(capsys, "predict", image_file, "-o", output, "--model", model_file, "--device", "cpu")
    assert code == 1
    assert one_line(err) == f"napari-unet: error: cannot write {output}: No space left on device"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_predict_into_a_read_only_folder_is_refused_before_inference(tmp_path, capsys, model_file, image_file):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        code, _, err = run(capsys, "predict", image_file, "-o", folder / "o.tif", "--model", model_file)
    finally:
        folder.chmod(0o755)
    assert code == 2 and "Permission denied" in one_line(err)


def test_predict_permission_denied_probe_is_refused_before_inference(tmp_path, capsys, model_file,
                                                                      image_file, monkeypatch):
    from napari_unet.io import files

    def denied(folder):
        raise PermissionError(errno.EACCES, "Permission denied", str(folder / ".probe"))

    monkeypatch.setattr(files, "_probe_writable", denied)
    output = tmp_path / "o.tif"
    code, _, err = run(capsys, "predict", image_file, "-o", output, "--model", model_file)
    assert code == 2
    assert one_line(err) == f"napari-unet: error: cannot write {output}: Permission denied ({tmp_path})"


# --- 5. bool images ---------------------------------------------------------------------------


def test_bool_image_is_segmented_as_0_1(tmp_path, capsys, model_file):
    mask = np.zeros((32, 32), bool)
    mask[8:20, 8:20] = True
    path = tmp_path / "mask.tif"
    tifffile.imwrite(path, mask)
    assert read_image(path).data.dtype == np.bool_
    code, _, err = run(capsys, "predict", path, "-o", tmp_path / "o.tif", "--model", model_file,
                       "--device", "cpu", "--output", "probabilities")
    assert code == 0, err
    assert np.isfinite(read_image(tmp_path / "o.tif").data).all()


# --- 6. truncated TIFF opened lazily ----------------------------------------------------------


def tifffile_log_records(caplog) -> list[str]:
    """tifffile's log messages that reached logging (printed on stderr outside of pytest)."""
    return [record.getMessage() for record in caplog.records if record.name.startswith("tifffile")]


def test_truncated_tiff_with_zarr_output_fails_at_opening(tmp_path, capsys, caplog, model_file):
    data = np.random.default_rng(0).integers(0, 255, (8, 32, 32), dtype=np.uint8)
    full = tmp_path / "full.tif"
    tifffile.imwrite(full, data, imagej=True, metadata={"axes": "ZYX"})
    cut = tmp_path / "cut.tif"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    model = save_checkpoint(tiny_model(3, depth=2, base=2), tmp_path / "m3.pt")
    code, _, err = run(capsys, "predict", cut, "-o", tmp_path / "o.zarr", "--model", model, "--device", "cpu")
    assert code == 2
    line = one_line(err)  # also: no tifffile log line before it
    assert line.startswith(f"napari-unet: error: cannot read {cut}: the TIFF file is truncated or damaged")
    assert tifffile_log_records(caplog) == []
    assert not (tmp_path / "o.zarr").exists()


# --- 7. eval with float predictions -----------------------------------------------------------


def test_eval_refuses_a_probability_map_and_thresholds_it_on_request(tmp_path, capsys):
    gt = np.zeros((16, 16), np.uint8)
    gt[4:10, 4:10] = 1
    prob = gt * 0.9 + 0.05
    prob = prob.astype(np.float32)
    tifffile.imwrite(tmp_path / "gt.tif", gt)
    tifffile.imwrite(tmp_path / "prob.tif", prob)
    code, _, err = run(capsys, "eval", tmp_path / "prob.tif", tmp_path / "gt.tif")
    assert code == 2
    assert one_line(err) == ("napari-unet: error: prediction prob.tif holds fractional values (a "
                             "probability map?); binarise it first (eval --threshold 0.5) or predict "
                             "with --output labels")
    code, out, _ = run(capsys, "eval", tmp_path / "prob.tif", tmp_path / "gt.tif", "--threshold", "0.5")
    assert code == 0 and out.startswith("dice=1.000")


def test_eval_nan_prediction_is_not_foreground(tmp_path, capsys):
    tifffile.imwrite(tmp_path / "nan.tif", np.full((8, 8), np.nan, np.float32))
    tifffile.imwrite(tmp_path / "ones.tif", np.ones((8, 8), np.uint8))
    code, _, err = run(capsys, "eval", tmp_path / "nan.tif", tmp_path / "ones.tif")
    assert code == 2 and "NaN or infinite" in one_line(err)
    code, out, _ = run(capsys, "eval", tmp_path / "nan.tif", tmp_path / "ones.tif", "--threshold", "0.5")
    assert code == 0 and out.startswith("dice=0.000")


def test_eval_float_labels_with_whole_numbers_are_scored(tmp_path, capsys):
    gt = np.zeros((16, 16), np.uint16)
    gt[2:6, 2:6], gt[9:14, 9:14] = 1, 2
    tifffile.imwrite(tmp_path / "gt.tif", gt)
    tifffile.imwrite(tmp_path / "pred.tif", gt.astype(np.float32))
    code, out, _ = run(capsys, "eval", tmp_path / "pred.tif", tmp_path / "gt.tif")
    assert code == 0 and "f1=1.000" in out


# --- 8. closed stdout -------------------------------------------------------------------------


def test_models_into_a_closed_pipe_has_no_traceback():
    process = subprocess.Popen([sys.executable, "-m", "napari_unet.cli", "models"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # like `| head -1` that has already exited
    _, err = process.communicate(timeout=120)
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()
    assert process.returncode == 141


# --- 9. messages ------------------------------------------------------------------------------


def test_damaged_checkpoint_is_one_line_with_details_under_verbose(tmp_path, capsys, image_file):
    import torch

    path = save_checkpoint(tiny_model(2, depth=2, base=2), tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    payload["config"]["base_channels"] = 8
    torch.save(payload, path)
    args = ["predict", image_file, "-o", tmp_path / "o.tif", "--model", path]
    code, _, err = run(capsys, *args)
    assert code == 2
    line = one_line(err)
    assert line.startswith("napari-unet: error: m.pt is damaged: Error(s) in loading state_dict")
    assert line.endswith(" ... (--verbose for details)")
    code, _, err = run(capsys, *args, "--verbose")
    assert code == 2 and "Traceback" in err and err.count("size mismatch") > 10
    assert err.strip().splitlines()[-1] == line.replace(" (--verbose for details)", "")


@pytest.mark.parametrize("case,message", [
    ("text", "text.pt is not a checkpoint (not a file saved by napari-unet or torch.save)"),
    ("folder", "is a folder, not a model file (.pt)"),
])
def test_model_that_is_text_or_a_folder(tmp_path, capsys, image_file, case, message):
    model = tmp_path / "text.pt"
    if case == "text":
        model.write_text("this is not a model\n")
    else:
        model = tmp_path / "models"
        model.mkdir()
    code, _, err = run(capsys, "predict", image_file, "-o", tmp_path / "o.tif", "--model", model)
    assert code == 2 and one_line(err).endswith(message)
    assert "pickled" not in err and "not found" not in err


def test_eval_on_an_rgb_file_talks_about_labels_not_models(tmp_path, capsys):
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    tifffile.imwrite(tmp_path / "gt.tif", np.ones((8, 8), np.uint8))
    code, _, err = run(capsys, "eval", tmp_path / "rgb.png", tmp_path / "gt.tif")
    assert code == 2
    line = one_line(err)
    assert "rgb.png has 3 channels" in line and "one-channel label images" in line
    assert "model" not in line


def test_truncated_tiff_prints_no_tifffile_log_line(tmp_path, capsys, caplog, model_file):
    full = tmp_path / "full.tif"
    tifffile.imwrite(full, np.zeros((6, 16, 16), np.uint8))
    cut = tmp_path / "cut.tif"
    cut.write_bytes(full.read_bytes()[:900])
    code, _, err = run(capsys, "predict", cut, "-o", tmp_path / "o.tif", "--model", model_file)
    assert code == 2
    assert one_line(err).startswith(f"napari-unet: error: cannot read {cut}: the TIFF file is truncated")
    assert tifffile_log_records(caplog) == []


# --- 10. values refused at argument parsing ---------------------------------------------------


@pytest.mark.parametrize("option,value,message", [
    ("--batch-size", "0", "argument --batch-size: expected a positive integer, got '0'"),
    ("--batch-size", "-1", "argument --batch-size: expected a positive integer, got '-1'"),
    ("--min-size", "-5", "argument --min-size: expected an integer >= 0, got '-5'"),
    ("--threshold", "nan", "argument --threshold: expected a number in [0, 1], got 'nan'"),
    ("--threshold", "1.5", "argument --threshold: expected a number in [0, 1], got '1.5'"),
])
def test_predict_values_refused_at_parsing(tmp_path, capsys, model_file, image_file, option, value, message):
    code, _, err = run(capsys, "predict", image_file, "-o", tmp_path / "o.tif", "--model", model_file,
                       option, value)
    assert code == 2 and one_line(err) == f"napari-unet: error: {message}"
    assert not (tmp_path / "o.tif").exists()


@pytest.mark.parametrize("option,value,message", [
    ("--time-limit", "nan", "argument --time-limit: expected a positive number, got 'nan'"),
    ("--time-limit", "-3", "argument --time-limit: expected a positive number, got '-3'"),
    ("--batch-size", "0", "argument --batch-size: expected a positive integer, got '0'"),
    ("--learning-rate", "inf", "argument --learning-rate: expected a positive number, got 'inf'"),
])
def test_train_values_refused_at_parsing(tmp_path, capsys, train_data, option, value, message):
    code, _, err = run(capsys, "train", "--image", train_data["image"], "--labels", train_data["labels"],
                       "--dims", "2", option, value, "-o", tmp_path / "m.pt")
    assert code == 2 and one_line(err) == f"napari-unet: error: {message}"


# --- 11. signals during training --------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_training_saves_the_best_model_and_exits_130(tmp_path, capsys, train_data,
                                                                   monkeypatch, signum):
    from napari_unet.training import trainer

    real_run = trainer.Trainer.run

    def run_then_signal(self):
        job = real_run(self)
        for index, stats in enumerate(job):
            if index == 2:
                signal.raise_signal(signum)  # delivered to the CLI's handler, as from `kill`
            yield stats

    class Unhandled(BaseException):
        """The signal reached the handler that was there before main() (main ignored it)."""

    def unhandled(signum, frame):
        raise Unhandled(signum)

    monkeypatch.setattr(trainer.Trainer, "run", run_then_signal)
    target = tmp_path / "m.pt"
    previous = signal.signal(signum, unhandled)  # not the default: SIGTERM would end pytest
    try:
        code, out, err = run(capsys, "train", "--image", train_data["image"], "--labels",
                             train_data["labels"], "--dims", "2", *TINY, "--time-limit", "60", "-o", target)
    finally:
        signal.signal(signum, previous)
    assert code == 130
    name = signal.Signals(signum).name
    assert one_line(err) == f"napari-unet: interrupted by {name}; saved the best model so far to {target}"
    model = load_checkpoint(target)
    assert model.history[-1]["iterations"] >= 3 and model.history[-1]["seconds"] < 60
    assert f"wrote {target}" in out


def test_sigterm_handler_is_restored_after_main(tmp_path, capsys, model_file, image_file):
    before = signal.getsignal(signal.SIGTERM)
    assert main(["predict", str(image_file), "-o", str(tmp_path / "o.tif"), "--model", str(model_file),
                 "--device", "cpu"]) == 0
    assert signal.getsignal(signal.SIGTERM) == before
