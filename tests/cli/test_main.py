import subprocess
import sys

import numpy as np
import pytest
import tifffile

from napari_unet.cli.main import main
from napari_unet.engine.predict import segment
from napari_unet.io.readers import read_image
from napari_unet.model.checkpoint import save_checkpoint
from napari_unet.progress import drain

from ..conftest import tiny_model


@pytest.fixture
def model_file(tmp_path):
    return save_checkpoint(tiny_model(2, depth=2, base=2), tmp_path / "tiny.pt")


@pytest.fixture
def stack_file(tmp_path):
    rng = np.random.default_rng(0)
    data = (rng.random((4, 40, 50)) * 1000).astype(np.uint16)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / 0.2, 1 / 0.2),
                     metadata={"spacing": 1.5, "unit": "um", "axes": "ZYX"})
    return path


@pytest.mark.parametrize("output", ["labels", "instances", "probabilities"])
def test_predict_writes_what_the_engine_computes(tmp_path, model_file, stack_file, output, capsys):
    out = tmp_path / f"out_{output}.tif"
    assert main(["predict", str(stack_file), "-o", str(out), "--model", str(model_file),
                 "--device", "cpu", "--output", output, "--tile", "32,32"]) == 0
    written = read_image(out)
    assert written.voxel_size == pytest.approx((1.5, 0.2, 0.2))
    image = read_image(stack_file)
    from napari_unet.model.checkpoint import load_checkpoint

    expected = drain(segment(image.data, load_checkpoint(model_file), output=output, device="cpu",
                             tile_shape=(32, 32), voxel_size=image.voxel_size)).data
    if output == "probabilities":
        np.testing.assert_allclose(written.data, expected[0].astype(np.float32), atol=1e-3)
    else:
        np.testing.assert_array_equal(written.data, expected)
    assert "wrote" in capsys.readouterr().out


def test_models_lists_names_first(capsys):
    assert main(["models"]) == 0
    from napari_unet.model.checkpoint import list_pretrained

    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    assert [line.split("\t")[0] for line in lines] == list(list_pretrained())


@pytest.mark.parametrize("args,message", [
    (["predict", "missing.tif", "-o", "x.tif", "--model", "MODEL"], "file not found"),
    (["predict", "IMAGE", "-o", "x.tif", "--model", "no-such-model"], "unknown model"),
    (["predict", "IMAGE", "-o", "x.tif", "--model", "MODEL", "--device", "tpu"], "invalid choice"),
    (["predict", "IMAGE", "-o", "x.tif", "--model", "MODEL", "--tile", "0,-3"], "positive integers"),
    (["predict", "IMAGE", "-o", "x.png", "--model", "MODEL"], "must be a .tif"),
    (["predict", "IMAGE", "-o", "IMAGE", "--model", "MODEL"], "overwrite the input"),
    (["frobnicate"], "invalid choice"),
    (["predict", "IMAGE", "-o", "x.tif", "--model", "MODEL", "--hu-window", "40"], "CENTER,WIDTH"),
])
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, model_file, stack_file, args, message, capsys):
    args = [str(stack_file) if a == "IMAGE" else str(model_file) if a == "MODEL" else a for a in args]
    args = [str(tmp_path / a) if a in ("x.tif", "x.png") else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_3d_model_on_2d_image_is_a_clear_error(tmp_path, capsys):
    model = save_checkpoint(tiny_model(3, depth=2, base=2), tmp_path / "m3.pt")
    image = tmp_path / "flat.tif"
    tifffile.imwrite(image, np.zeros((32, 32), np.uint8))
    assert main(["predict", str(image), "-o", str(tmp_path / "o.tif"), "--model", str(model)]) == 2
    assert "needs a 3D stack" in capsys.readouterr().err


def test_console_script_runs_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "napari_unet.cli", "predict", "nope.tif", "-o",
                             str(tmp_path / "o.tif"), "--model", "x.pt"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("napari-unet: error:") and "Traceback" not in result.stderr


def test_input_file_is_not_modified(tmp_path, model_file, stack_file):
    before = stack_file.read_bytes()
    main(["predict", str(stack_file), "-o", str(tmp_path / "o.tif"), "--model", str(model_file), "--device", "cpu"])
    assert stack_file.read_bytes() == before


def test_hounsfield_window_overrides_model_normalisation(tmp_path, model_file):
    ct = np.random.default_rng(1).integers(-1000, 1500, (3, 32, 32)).astype(np.int16)
    path = tmp_path / "ct.tif"
    tifffile.imwrite(path, ct, photometric="minisblack")
    outs = []
    for window in ("40,400", "500,2000"):
        out = tmp_path / f"p_{window.replace(',', '_')}.tif"
        assert main(["predict", str(path), "-o", str(out), "--model", str(model_file), "--device", "cpu",
                     "--output", "probabilities", "--hu-window", window]) == 0
        outs.append(read_image(out).data)
    assert not np.allclose(outs[0], outs[1])


def test_predict_precision_choice(tmp_path, model_file, stack_file, capsys):
    from napari_unet.model.checkpoint import load_checkpoint

    image = read_image(stack_file)
    model = load_checkpoint(model_file)
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"p_{precision}.tif"
        assert main(["predict", str(stack_file), "-o", str(out), "--model", str(model_file),
                     "--device", "cpu", "--output", "probabilities", "--precision", precision]) == 0
        expected = drain(segment(image.data, model, output="probabilities", device="cpu",
                                 precision=precision)).data
        np.testing.assert_allclose(read_image(out).data, expected[0].astype(np.float32), atol=1e-3)
    exact, fast = read_image(tmp_path / "p_fp32.tif").data, read_image(tmp_path / "p_bf16.tif").data
    assert 0 < np.abs(exact - fast).max() < 0.05
    assert main(["predict", str(stack_file), "-o", str(tmp_path / "x.tif"), "--model", str(model_file),
                 "--precision", "int8"]) == 2
    assert main(["predict", str(stack_file), "-o", str(tmp_path / "y.tif"), "--model", str(model_file),
                 "--max-tile-gb", "0"]) == 2
    assert "--max-tile-gb must be positive" in capsys.readouterr().err


def test_predict_tta_writes_the_augmented_engine_result(tmp_path, model_file, stack_file, capsys):
    from napari_unet.model.checkpoint import load_checkpoint

    image = read_image(stack_file)
    model = load_checkpoint(model_file)
    out = tmp_path / "tta.tif"
    assert main(["predict", str(stack_file), "-o", str(out), "--model", str(model_file),
                 "--device", "cpu", "--output", "probabilities", "--precision", "fp32", "--tta"]) == 0
    expected = drain(segment(image.data, model, output="probabilities", device="cpu",
                             precision="fp32", tta=True)).data
    plain = drain(segment(image.data, model, output="probabilities", device="cpu",
                          precision="fp32")).data
    np.testing.assert_allclose(read_image(out).data, expected[0].astype(np.float32), atol=1e-3)
    assert np.abs(expected.astype(np.float32) - plain).max() > 1e-3


def test_suggest_prints_ranked_slices_and_writes_the_map(tmp_path, model_file, stack_file, capsys):
    from napari_unet.engine.uncertainty import rank_slices, uncertainty_map
    from napari_unet.model.checkpoint import load_checkpoint

    capsys.readouterr()
    out = tmp_path / "u.tif"
    assert main(["suggest", str(stack_file), "--model", str(model_file), "-n", "2", "--device",
                 "cpu", "--precision", "fp32", "--min-gap", "1", "--uncertainty", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "slice\tscore" and len(lines) == 3
    printed = [(int(a), float(b)) for a, b in (line.split("\t") for line in lines[1:])]
    image = read_image(stack_file)
    result = drain(segment(image.data, load_checkpoint(model_file), output="labels", device="cpu",
                           precision="fp32"))
    u = uncertainty_map(result.probabilities, "foreground")
    expected = rank_slices(u, result.probabilities, 2, min_gap=1)
    assert [z for z, _ in printed] == [z for z, _ in expected]
    assert [s for _, s in printed] == pytest.approx([s for _, s in expected], abs=1e-4)
    assert printed[0][1] >= printed[1][1]
    written = read_image(out)
    assert written.data.shape == image.data.shape and written.voxel_size == pytest.approx((1.5, 0.2, 0.2))
    np.testing.assert_allclose(written.data, u, atol=1e-3)
    # excluded slices are never suggested; TTA runs too
    assert main(["suggest", str(stack_file), "--model", str(model_file), "-n", "2", "--device", "cpu",
                 "--exclude", str(printed[0][0]), "--tta"]) == 0
    again = [int(line.split("\t")[0]) for line in capsys.readouterr().out.strip().splitlines()[1:]]
    assert printed[0][0] not in again and len(again) == 2


def test_suggest_refuses_a_2d_image(tmp_path, model_file, capsys):
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, np.random.default_rng(0).random((32, 32)).astype(np.float32))
    assert main(["suggest", str(path), "--model", str(model_file)]) == 2
    assert "3D stack" in capsys.readouterr().err


def test_a_missing_extra_is_named_in_one_line(tmp_path, model_file, stack_file, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "distributed" else real(name, *a))
    assert main(["predict", str(stack_file), "-o", str(tmp_path / "o.zarr"), "--model",
                 str(model_file), "--dask"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("napari-unet: error: --dask needs the optional package 'distributed': "
                   "pip install 'napari-unet-loop[dask]'")
