"""``predict --object-size``: the image zoomed per tile to the model's training object size."""

import numpy as np
import pytest
import tifffile

from napari_unet.cli.main import main
from napari_unet.engine.predict import segment
from napari_unet.io.readers import read_image
from napari_unet.model.checkpoint import load_checkpoint, save_checkpoint
from napari_unet.progress import drain

from ..conftest import tiny_model


@pytest.fixture
def sized_model(tmp_path):
    model = tiny_model(2, depth=2, base=2)
    model.object_size = {"diameter_voxels": 20.0, "volume_voxels": 314.0, "diameter_um": None}
    return save_checkpoint(model, tmp_path / "tiny.pt")


@pytest.fixture
def image_file(tmp_path):
    yy, xx = np.indices((48, 56))
    image = (((yy - 20) ** 2 + (xx - 25) ** 2 < 80) * 900 + 50).astype(np.uint16)
    path = tmp_path / "image.tif"
    tifffile.imwrite(path, image)
    return path


def test_object_size_writes_the_zoomed_engine_result(tmp_path, sized_model, image_file, capsys):
    out = tmp_path / "out.tif"
    assert main(["predict", str(image_file), "-o", str(out), "--model", str(sized_model),
                 "--device", "cpu", "--output", "probabilities", "--object-size", "10px"]) == 0
    assert "resampling tiles x(2, 2)" in capsys.readouterr().err
    written = read_image(out).data
    image = read_image(image_file).data
    model = load_checkpoint(sized_model)
    expected = drain(segment(image, model, output="probabilities", device="cpu",
                             scale=(2.0, 2.0))).data[0]
    plain = drain(segment(image, model, output="probabilities", device="cpu")).data[0]
    assert written.shape == image.shape
    np.testing.assert_allclose(written, expected, atol=1e-6)
    assert np.abs(written - plain).max() > 1e-3


@pytest.mark.parametrize("value, message", [
    ("0", "positive"), ("-4", "positive"), ("twelve", "like 12, 12px or 12um"),
    ("12mm", "like 12, 12px or 12um"), ("inf", "positive"), ("0.5px", "beyond 1/16..16"),
    ("1000", "beyond 1/16..16")])
def test_bad_object_sizes_exit_2_in_one_line(tmp_path, sized_model, image_file, value, message,
                                             capsys):
    assert main(["predict", str(image_file), "-o", str(tmp_path / "o.tif"), "--model",
                 str(sized_model), f"--object-size={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "o.tif").exists()


def test_object_size_needs_what_it_refers_to(tmp_path, image_file, capsys):
    plain = save_checkpoint(tiny_model(2, depth=2, base=2), tmp_path / "plain.pt")
    assert main(["predict", str(image_file), "-o", str(tmp_path / "o.tif"), "--model",
                 str(plain), "--object-size", "12"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not store the size" in err


def test_suggest_takes_the_object_size(tmp_path, sized_model, capsys):
    from napari_unet.engine.uncertainty import suggest

    rng = np.random.default_rng(0)
    stack = (rng.random((6, 40, 44)) * 1000).astype(np.uint16)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack)
    assert main(["suggest", str(path), "--model", str(sized_model), "-n", "2", "--device", "cpu",
                 "--object-size", "40px"]) == 0
    captured = capsys.readouterr()
    assert "resampling tiles x(0.5, 0.5)" in captured.err
    printed = [int(line.split("\t")[0]) for line in captured.out.strip().splitlines()[1:]]
    model = load_checkpoint(sized_model)
    expected = drain(suggest(stack, model, 2, device="cpu", scale=(0.5, 0.5)))
    assert printed == [z for z, _ in expected.slices]
    assert main(["suggest", str(path), "--model", str(sized_model), "--object-size", "x"]) == 2


def test_auto_estimates_then_zooms(tmp_path, capsys):
    from scipy import ndimage as ndi

    from ..engine.test_resample import nuclei

    image, _ = nuclei((300, 300), 60, 13)
    path = tmp_path / "large.tif"
    tifffile.imwrite(path, ndi.zoom(image, 2.0, order=1).astype(np.float32))
    out = tmp_path / "out.tif"
    assert main(["predict", str(path), "-o", str(out), "--model", "nuclei-2d", "--device", "cpu",
                 "--output", "instances", "--object-size", "auto"]) == 0
    err = capsys.readouterr().err
    assert "resampling tiles x(0." in err and "estimated object diameter" in err
    assert read_image(out).data.shape == (600, 600)


def test_default_zoom_comes_from_voxel_sizes_in_um(tmp_path, capsys):
    from napari_unet.io.writers import write_image_tiff

    model = tiny_model(3, depth=2, base=2)
    model.voxel_size = [0.5, 0.2, 0.2]
    model.object_size = {"diameter_voxels": 10.0, "diameter_um": 2.5, "volume_voxels": 520.0}
    path = save_checkpoint(model, tmp_path / "tiny3d.pt")
    stack = (np.random.default_rng(1).random((12, 40, 40)) * 1000).astype(np.float32)
    expected = drain(segment(stack, load_checkpoint(path), output="probabilities", device="cpu",
                             scale=(2.0, 1.0, 2.0))).data[0]
    for unit, sizes in (("um", (1.0, 0.2, 0.4)), ("mm", (0.001, 0.0002, 0.0004))):
        image = tmp_path / f"stack_{unit}.tif"
        write_image_tiff(image, stack, voxel_size=sizes, unit=unit)
        out = tmp_path / f"out_{unit}.tif"
        assert main(["predict", str(image), "-o", str(out), "--model", str(path), "--device",
                     "cpu", "--output", "probabilities"]) == 0
        assert "resampling tiles x(2, 1, 2) for the model: the image's voxel size" in \
            capsys.readouterr().err
        written = read_image(out).data
        assert written.shape == stack.shape
        np.testing.assert_allclose(written, expected, atol=1e-6)
