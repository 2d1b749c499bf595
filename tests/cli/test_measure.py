"""``napari-unet measure``: a labels file (and its image) to a CSV with calibrated columns."""

import subprocess
import sys

import numpy as np
import pytest

from napari_unet.cli.main import main
from napari_unet.io.table import read_csv
from napari_unet.io.writers import write_image_tiff, write_labels_tiff


@pytest.fixture
def files(tmp_path):
    labels = np.zeros((6, 30, 40), dtype=np.uint16)
    labels[1:3, 2:12, 5:10] = 4  # 2 x 10 x 5 voxels
    labels[2:6, 20:25, 30:40] = 9  # 4 x 5 x 10
    image = np.where(labels == 9, 50, 10).astype(np.uint16)
    write_labels_tiff(tmp_path / "labels.tif", labels, voxel_size=(2.0, 0.5, 0.5), unit="um")
    write_image_tiff(tmp_path / "image.tif", image, voxel_size=(2.0, 0.5, 0.5), unit="um")
    return tmp_path / "labels.tif", tmp_path / "image.tif"


def test_measure_writes_one_row_per_object_in_calibrated_units(files, tmp_path, capsys):
    labels, image = files
    out = tmp_path / "table.csv"
    assert main(["measure", str(labels), "--image", str(image), "-o", str(out)]) == 0
    table = read_csv(out)
    assert table["label"] == ["4", "9"]
    assert table["voxels"] == ["100", "200"]
    assert [float(v) for v in table["volume [um^3]"]] == [50.0, 100.0]
    assert [float(v) for v in table["centroid_z [um]"]] == [3.0, 7.0]
    assert [float(v) for v in table["mean_intensity"]] == [10.0, 50.0]
    assert "2 objects measured" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_voxel_size_option_overrides_the_file_and_no_image_means_no_intensity(files, tmp_path):
    labels, _ = files
    out = tmp_path / "t.csv"
    assert main(["measure", str(labels), "-o", str(out), "--voxel-size", "1,1,1",
                 "--unit", "nm"]) == 0
    table = read_csv(out)
    assert [float(v) for v in table["volume [nm^3]"]] == [100.0, 200.0]
    assert "mean_intensity" not in table


def test_errors_are_one_line_and_leave_no_file(files, tmp_path, capsys):
    labels, _ = files
    other = tmp_path / "other.tif"
    write_image_tiff(other, np.zeros((6, 30, 41), np.uint8))
    out = tmp_path / "t.csv"
    assert main(["measure", str(labels), "--image", str(other), "-o", str(out)]) == 2
    assert "shape" in capsys.readouterr().err and not out.exists()
    assert main(["measure", str(labels), "-o", str(out), "--voxel-size", "1,1"]) == 2
    assert not out.exists()


def test_measure_runs_as_a_command(files, tmp_path):
    labels, _ = files
    out = tmp_path / "t.csv"
    done = subprocess.run([sys.executable, "-m", "napari_unet.cli", "measure", str(labels),
                           "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert read_csv(out)["label"] == ["4", "9"]


def test_an_uncalibrated_file_is_measured_in_pixels(tmp_path):
    labels = np.zeros((30, 40), dtype=np.uint16)
    labels[2:12, 5:10] = 3
    write_labels_tiff(tmp_path / "plain.tif", labels)  # no pixel size, no unit
    out = tmp_path / "plain.csv"
    assert main(["measure", str(tmp_path / "plain.tif"), "-o", str(out)]) == 0
    table = read_csv(out)
    assert [float(v) for v in table["area [px^2]"]] == [50.0]  # not "um^2": nothing says um
