"""The holes a bad-input sweep found on the command line (issue 23, cases C1-C12): each ends
with one line that says what is wrong and what to do, exit 2 (usage) or 1 (runtime), no
traceback, and no file changed."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_unet.model.checkpoint import load_checkpoint, save_checkpoint

from ..conftest import tiny_model
from .test_faults import TINY, one_line, run


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def model_file(tmp_path) -> Path:
    return save_checkpoint(tiny_model(2, depth=2, base=2), tmp_path / "tiny.pt")


def noise(shape, seed, dtype=np.uint16) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape) * 1000).astype(dtype)


@pytest.fixture
def no_inference(monkeypatch):
    """Fail the test when inference starts (a refusal must come before)."""
    from napari_unet.bigdata import streaming
    from napari_unet.engine import predict
    from napari_unet.zoo import predict as zoo_predict

    def never(*args, **kwargs):
        raise AssertionError("inference started")

    monkeypatch.setattr(predict, "segment", never)
    monkeypatch.setattr(zoo_predict, "segment_model", never)
    monkeypatch.setattr(streaming, "predict_to_zarr", never)


# --- C1: a .zarr resume from another image ---------------------------------------------------


def test_c1_zarr_resume_from_another_image_is_refused(tmp_path, capsys, model_file):
    first, second = tmp_path / "a.tif", tmp_path / "b.tif"
    tifffile.imwrite(first, noise((48, 48), 0))
    tifffile.imwrite(second, noise((48, 48), 1))
    out = tmp_path / "z.zarr"
    code, _, _ = run(capsys, "predict", first, "-o", out, "--model", model_file, "--device", "cpu")
    assert code == 0
    before = tree_digest(out)
    code, stdout, err = run(capsys, "predict", second, "-o", out, "--model", model_file, "--device", "cpu")
    assert code == 2 and "resumed" not in stdout
    line = one_line(err)
    assert "another image" in line and "--overwrite" in line
    # the same path with other content (same shape and dtype) is refused too
    tifffile.imwrite(first, noise((48, 48), 2))
    code, _, err = run(capsys, "predict", first, "-o", out, "--model", model_file, "--device", "cpu")
    assert code == 2 and "another image" in one_line(err)
    assert tree_digest(out) == before
    # --overwrite starts over
    code, stdout, _ = run(capsys, "predict", second, "-o", out, "--model", model_file, "--device",
                          "cpu", "--overwrite")
    assert code == 0 and "resumed" not in stdout


def test_c1_input_fingerprint_is_cheap_and_sees_content():
    from napari_unet.bigdata.store import input_fingerprint

    data = noise((20, 64, 64), 0)
    base = input_fingerprint(data, "x.tif")
    assert base == input_fingerprint(data.copy(), "x.tif")
    changed = data.copy()
    changed[10, 32, 32] += 1  # in the middle: inside a sampled block
    assert base["sample"] != input_fingerprint(changed, "x.tif")["sample"]
    assert base["shape"] == [20, 64, 64] and base["dtype"] == "uint16"


# --- C2: a training patch larger than the data ------------------------------------------------


def test_c2_train_patch_larger_than_the_data_is_clipped(tmp_path, capsys, monkeypatch):
    from napari_unet.training import sampling

    labels = np.zeros((12, 24, 24), np.uint16)
    labels[3:8, 5:15, 6:16] = 1
    image = ((labels > 0) * 100 + noise(labels.shape, 0) / 100).astype(np.float32)
    tifffile.imwrite(tmp_path / "i.tif", image)
    tifffile.imwrite(tmp_path / "l.tif", labels)
    shapes = []
    real = sampling.sample_patches

    def spy(items, probabilities, patch, *args, **kwargs):
        shapes.append(tuple(patch))
        return real(items, probabilities, patch, *args, **kwargs)

    monkeypatch.setattr(sampling, "sample_patches", spy)
    from napari_unet.training import trainer as trainer_module
    monkeypatch.setattr(trainer_module, "sample_patches", spy)
    code, out, err = run(capsys, "train", "--image", tmp_path / "i.tif", "--labels", tmp_path / "l.tif",
                         "--dims", "3", *TINY, "--iterations", "1", "--patch", "64,512,512",
                         "--no-tune", "-o", tmp_path / "m.pt")
    assert code == 0, err
    assert shapes and all(s[0] <= 12 and s[1] <= 24 and s[2] <= 24 for s in shapes)
    assert "patch 64,512,512 is larger than the data" in err + out
    assert load_checkpoint(tmp_path / "m.pt").history[-1]["patch_shape"] == list(shapes[0])


# --- C3: disk full at the final save (torch raises RuntimeError) -------------------------------


def test_c3_train_disk_full_runtime_error_of_torch_saves_a_fallback(tmp_path, capsys, monkeypatch):
    import torch

    rng = np.random.default_rng(0)
    labels = np.zeros((32, 32), np.uint16)
    labels[4:12, 4:12] = 1
    image = ((labels > 0) * 100 + rng.normal(10, 3, labels.shape)).astype(np.float32)
    tifffile.imwrite(tmp_path / "i.tif", image)
    tifffile.imwrite(tmp_path / "l.tif", labels)
    out_dir = tmp_path / "small"
    out_dir.mkdir()
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    real_save = torch.save

    def save(obj, handle, *args, **kwargs):
        name = getattr(handle, "name", handle)
        if isinstance(name, (str, os.PathLike)) and Path(name).parent == out_dir:
            handle.write(b"partial")
            # what torch 2.x raises when the disk fills up during torch.save
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    target = out_dir / "m.pt"
    code, _, err = run(capsys, "train", "--image", tmp_path / "i.tif", "--labels", tmp_path / "l.tif",
                       "--dims", "2", *TINY, "--iterations", "1", "--no-tune", "-o", target)
    assert code == 1
    line = one_line(err)
    saved = list((cache / "napari-unet").glob("m-recovered-*.pt"))
    assert len(saved) == 1 and load_checkpoint(saved[0]).spatial_dims == 2
    assert line.startswith(f"napari-unet: error: cannot write {target}: ")
    assert line.endswith(f"the trained model was saved to {saved[0]} instead")
    assert list(out_dir.iterdir()) == []


# --- C4: a complex-valued TIFF -------------------------------------------------------------------


def test_c4_complex_tiff_is_one_line(tmp_path, capsys, model_file, no_inference):
    path = tmp_path / "complex.tif"
    tifffile.imwrite(path, (noise((32, 32), 0) + 1j * noise((32, 32), 1)).astype(np.complex64))
    before = digest(path)
    code, _, err = run(capsys, "predict", path, "-o", tmp_path / "o.tif", "--model", model_file,
                       "--device", "cpu")
    assert code == 2
    line = one_line(err)
    assert "complex" in line and "magnitude" in line
    assert digest(path) == before and not (tmp_path / "o.tif").exists()


# --- C5, C6, C7: damaged bioimage.io packages ------------------------------------------------


def _rewritten(package: Path, target: Path, edit) -> Path:
    """A copy of ``package`` whose rdf.yaml is ``edit(rdf dict)``."""
    import yaml

    with zipfile.ZipFile(package) as src, zipfile.ZipFile(target, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "rdf.yaml":
                rdf = yaml.safe_load(data)
                edit(rdf)
                data = yaml.safe_dump(rdf).encode()
            dst.writestr(item, data)
    return target


@pytest.fixture
def package(tmp_path) -> Path:
    pytest.importorskip("bioimageio.spec")
    pytest.importorskip("onnxruntime")
    from ..zoo.test_zoo import foreign_package

    return foreign_package(tmp_path / "pkg", "torchscript")


@pytest.fixture
def image_file(tmp_path) -> Path:
    path = tmp_path / "image.tif"
    tifffile.imwrite(path, noise((48, 48), 0))
    return path


def _short_axes(rdf):
    rdf["inputs"][0]["axes"] = rdf["inputs"][0]["axes"][:3]  # no x axis


@pytest.mark.parametrize("case", ["empty_weights", "short_axes"])
@pytest.mark.parametrize("command", ["predict", "export"])
def test_c5_zip_with_empty_weights_or_short_axes(tmp_path, capsys, package, image_file, case,
                                                 command):
    edit = {"empty_weights": lambda rdf: rdf.update(weights={}), "short_axes": _short_axes}[case]
    broken = _rewritten(package, tmp_path / f"{case}.zip", edit)
    if command == "predict":
        args = ["predict", image_file, "-o", tmp_path / "o.tif", "--model", broken]
    else:
        args = ["export", broken, "-o", tmp_path / "o.zip"]
    code, _, err = run(capsys, *args, "--device", "cpu") if command == "predict" else run(capsys, *args)
    assert code == 2
    line = one_line(err)
    assert f"{case}.zip" in line and "model_extra" not in line
    assert not (tmp_path / "o.tif").exists() and not (tmp_path / "o.zip").exists()


def test_c6_truncated_zip_says_so(tmp_path, capsys, package, image_file):
    data = package.read_bytes()
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    code, _, err = run(capsys, "predict", image_file, "-o", tmp_path / "o.tif", "--model", truncated)
    assert code == 2
    line = one_line(err)
    assert "the zip is truncated or damaged" in line and "codec" not in line


def test_c7_weights_that_do_not_match_their_sha256_are_refused(tmp_path, capsys, package, image_file,
                                                               no_inference):
    import yaml

    with zipfile.ZipFile(package) as src:
        rdf = yaml.safe_load(src.read("rdf.yaml"))
    entry = rdf["weights"]["torchscript"]
    entry["sha256"] = "0" * 64
    altered = _rewritten(package, tmp_path / "altered.zip", lambda r: r.update(weights=rdf["weights"]))
    code, _, err = run(capsys, "predict", image_file, "-o", tmp_path / "o.tif", "--model", altered)
    assert code == 2
    line = one_line(err)
    assert "sha256" in line and "altered.zip" in line


# --- C8: invalid z spacing ----------------------------------------------------------------------


@pytest.mark.parametrize("spacing", [-1.0, 0.0, float("nan")])
def test_c8_invalid_z_spacing_warns_and_keeps_xy(tmp_path, capsys, spacing):
    from napari_unet.io.readers import read_image

    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, noise((4, 16, 16), 0), imagej=True, resolution=(1 / 0.127, 1 / 0.127),
                     metadata={"spacing": spacing, "unit": "um", "axes": "ZYX"})
    with pytest.warns(UserWarning, match="z spacing") as record:
        image = read_image(path)
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert image.unit == "um"
    assert image.voxel_size[1:] == pytest.approx((0.127, 0.127))
    assert image.voxel_size[0] == pytest.approx(0.127)


def test_c8_predict_keeps_the_xy_calibration_with_a_one_line_warning(tmp_path, capsys, model_file):
    from napari_unet.io.readers import read_image

    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, noise((3, 32, 32), 0), imagej=True, resolution=(1 / 0.127, 1 / 0.127),
                     metadata={"spacing": -2.0, "unit": "um", "axes": "ZYX"})
    code, _, err = run(capsys, "predict", path, "-o", tmp_path / "o.tif", "--model", model_file,
                       "--device", "cpu")
    assert code == 0
    line = one_line(err.replace("\r", "\n").split("\n")[0] + "\n")
    assert line.startswith("napari-unet: warning:") and "z spacing" in line
    written = read_image(tmp_path / "o.tif")
    assert written.unit == "um" and written.voxel_size[1:] == pytest.approx((0.127, 0.127))


# --- C9: an output that is a hard link to the input -------------------------------------------


@pytest.mark.parametrize("suffix", [".tif", ".zarr"])
def test_c9_hard_link_to_the_input_is_refused_before_inference(tmp_path, capsys, model_file,
                                                               no_inference, suffix):
    source = tmp_path / "in.tif"
    tifffile.imwrite(source, noise((32, 32), 0))
    before = digest(source)
    link = tmp_path / f"link{suffix}"
    os.link(source, link)
    code, _, err = run(capsys, "predict", source, "-o", link, "--model", model_file, "--device", "cpu")
    assert code == 2
    assert "is the input image" in one_line(err) and "choose another" in one_line(err)
    assert digest(source) == before


# --- C10: an untagged 4D TIFF -------------------------------------------------------------------


def test_c10_untagged_4d_tiff_says_how_to_pick_the_axes(tmp_path, capsys, model_file, no_inference):
    path = tmp_path / "four.tif"
    tifffile.imwrite(path, noise((2, 5, 16, 16), 0))  # axes QQYX
    code, _, err = run(capsys, "predict", path, "-o", tmp_path / "o.tif", "--model", model_file)
    assert code == 2
    line = one_line(err)
    assert "axes" in line and "ImageJ" in line and "3D" in line


# --- C11: suggest with every slice excluded -----------------------------------------------------


def test_c11_suggest_with_every_slice_excluded(tmp_path, capsys, model_file, monkeypatch):
    from napari_unet.engine import uncertainty

    def never(*args, **kwargs):
        raise AssertionError("inference started")

    monkeypatch.setattr(uncertainty, "suggest", never)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, noise((6, 32, 32), 0))
    code, out, err = run(capsys, "suggest", path, "--model", model_file, "--exclude", "0-5")
    assert code == 2 and out == ""
    assert "no slices left to suggest" in one_line(err)


# --- C12: a .zarr output made with other settings ----------------------------------------------


@pytest.mark.parametrize("first,second,named", [
    ([], ["--tta"], "--tta"),
    ([], ["--threshold", "0.3"], "--threshold"),
    ([], ["--save-probabilities"], "--save-probabilities"),
    ([], ["MODEL2"], "--model"),
])
def test_c12_zarr_with_other_settings_names_the_option(tmp_path, capsys, model_file, first, second,
                                                      named):
    source = tmp_path / "in.tif"
    tifffile.imwrite(source, noise((32, 32), 0))
    out = tmp_path / "o.zarr"
    other = save_checkpoint(tiny_model(2, depth=2, base=2, seed=5), tmp_path / "other.pt")

    def args(extra):
        model = other if "MODEL2" in extra else model_file
        return ["predict", source, "-o", out, "--model", model, "--device", "cpu",
                *[e for e in extra if e != "MODEL2"]]

    assert run(capsys, *args(first))[0] == 0
    before = tree_digest(out)
    code, _, err = run(capsys, *args(second))
    assert code == 2
    line = one_line(err)
    assert named in line and "--overwrite" in line and "overwrite=True" not in line
    assert tree_digest(out) == before
