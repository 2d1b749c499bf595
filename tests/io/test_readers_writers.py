"""Tests for napari_unet.io: reading every supported format, calibrated and atomic writing."""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import pytest
import tifffile

from napari_unet.io import writers
from napari_unet.io.files import atomic_write
from napari_unet.io.formats import ImageReadError, LoadedImage
from napari_unet.io.readers import read_image
from napari_unet.io.writers import (
    write_image_tiff,
    write_labels_tiff,
    write_tiff_atomic,
)
from napari_unet.labels.dtypes import smallest_label_dtype

RNG = np.random.default_rng(0)


def assert_voxel_size(actual, expected):
    assert actual is not None
    np.testing.assert_allclose(actual, expected, rtol=1e-6)


# --- module hygiene -------------------------------------------------------------------------


def test_io_imports_no_gui_and_no_heavy_optional_libs():
    import subprocess

    code = (
        "import sys, napari_unet.io; "
        "bad = [m for m in ('qtpy', 'napari', 'magicgui', 'nibabel', 'pydicom') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    cwd = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, check=True
    )
    assert out.stdout.strip() == ""


# --- TIFF -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, voxel_size, unit",
    [((20, 30), (0.7, 0.3), "um"), ((4, 20, 30), (2.5, 0.7, 0.3), "mm")],
)
def test_imagej_tiff_round_trip_keeps_data_voxel_size_and_unit(tmp_path, shape, voxel_size, unit):
    data = RNG.integers(0, 60000, size=shape, dtype=np.uint16)
    out = write_image_tiff(tmp_path / "img.tif", data, voxel_size=voxel_size, unit=unit)
    loaded = read_image(out)
    assert loaded.axes == ("YX" if len(shape) == 2 else "ZYX")
    assert loaded.data.dtype == np.uint16
    np.testing.assert_array_equal(loaded.data, data)
    assert_voxel_size(loaded.voxel_size, voxel_size)
    assert loaded.unit == unit
    assert loaded.spatial_shape() == shape
    assert loaded.path == out
    with tifffile.TiffFile(out) as tif:  # really an ImageJ file, compressed
        assert tif.is_imagej
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        # X resolution belongs to the last voxel size (tifffile orders resolution X, Y)
        num, den = tif.pages[0].tags["XResolution"].value
        assert den / num == pytest.approx(voxel_size[-1], rel=1e-6)


def test_tiff_without_calibration_has_no_voxel_size(tmp_path):
    data = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = write_image_tiff(tmp_path / "plain.tif", data)
    loaded = read_image(out)
    assert loaded.voxel_size is None and loaded.unit is None
    np.testing.assert_array_equal(loaded.data, data)


def test_imagej_micron_unit_spelling_is_normalized(tmp_path):
    path = tmp_path / "fiji.tif"
    tifffile.imwrite(
        path,
        np.zeros((2, 5, 6), np.uint8),
        imagej=True,
        resolution=(1 / 0.5, 1 / 0.25),
        metadata={"axes": "ZYX", "spacing": 3.0, "unit": "micron"},
    )
    loaded = read_image(path)
    assert loaded.unit == "um"
    assert_voxel_size(loaded.voxel_size, (3.0, 0.25, 0.5))


def test_ome_tiff_voxel_size_converted_to_one_unit(tmp_path):
    data = RNG.integers(0, 255, size=(3, 8, 9), dtype=np.uint8)
    path = tmp_path / "img.ome.tif"
    tifffile.imwrite(
        path,
        data,
        ome=True,
        metadata={
            "axes": "ZYX",
            "PhysicalSizeX": 0.3,
            "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": 0.4,
            "PhysicalSizeYUnit": "µm",
            "PhysicalSizeZ": 1500.0,
            "PhysicalSizeZUnit": "nm",
        },
    )
    loaded = read_image(path)
    assert loaded.axes == "ZYX"
    np.testing.assert_array_equal(loaded.data, data)
    assert loaded.unit == "um"
    assert_voxel_size(loaded.voxel_size, (1.5, 0.4, 0.3))


def test_singleton_axes_are_squeezed(tmp_path):
    path = tmp_path / "hyper.tif"
    data = RNG.integers(0, 255, size=(1, 5, 1, 6, 7), dtype=np.uint8)
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "TZCYX"})
    loaded = read_image(path)
    assert loaded.axes == "ZYX"
    assert loaded.data.shape == (5, 6, 7)


def test_plain_multipage_tiff_is_read_as_zyx(tmp_path):
    path = tmp_path / "pages.tif"
    data = RNG.integers(0, 255, size=(4, 6, 7), dtype=np.uint8)
    tifffile.imwrite(path, data, photometric="minisblack")
    loaded = read_image(path)
    assert loaded.axes == "ZYX"
    np.testing.assert_array_equal(loaded.data, data)


def test_time_series_refused_naming_axes_and_sizes(tmp_path):
    path = tmp_path / "movie.tif"
    tifffile.imwrite(path, np.zeros((5, 10, 16, 16), np.uint8), imagej=True, metadata={"axes": "TZYX"})
    for allow in (False, True):
        with pytest.raises(ImageReadError) as info:
            read_image(path, allow_channels=allow)
        message = str(info.value)
        assert "TZYX" in message and "T=5" in message and "Z=10" in message
        assert "time" in message


def test_multichannel_tiff_refused_unless_allowed(tmp_path):
    path = tmp_path / "channels.tif"
    data = RNG.integers(0, 255, size=(3, 2, 8, 9), dtype=np.uint8)  # ZCYX as ImageJ stores it
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "ZCYX"})
    with pytest.raises(ImageReadError, match=r"ZCYX \(Z=3, C=2, Y=8, X=9\)"):
        read_image(path)
    loaded = read_image(path, allow_channels=True)
    assert loaded.axes == "CZYX"
    np.testing.assert_array_equal(loaded.data, data.transpose(1, 0, 2, 3))
    assert loaded.spatial_shape() == (3, 8, 9)


def test_more_than_three_spatial_axes_refused(tmp_path):
    path = tmp_path / "odd.tif"
    tifffile.imwrite(path, np.zeros((2, 3, 4, 5), np.uint8), photometric="minisblack",
                     metadata={"axes": "QZYX"})
    with pytest.raises(ImageReadError, match="spatial"):
        read_image(path)


# --- PNG / JPEG -----------------------------------------------------------------------------


def test_png_grayscale_read(tmp_path):
    from PIL import Image

    data = RNG.integers(0, 255, size=(12, 17), dtype=np.uint8)
    Image.fromarray(data).save(tmp_path / "gray.png")
    loaded = read_image(tmp_path / "gray.png")
    assert loaded.axes == "YX"
    assert loaded.voxel_size is None
    np.testing.assert_array_equal(loaded.data, data)


def test_png_16bit_read(tmp_path):
    from PIL import Image

    data = RNG.integers(0, 65535, size=(6, 7), dtype=np.uint16)
    Image.fromarray(data).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(read_image(tmp_path / "deep.png").data, data)


def test_rgb_png_refused_naming_axes_and_accepted_with_channels(tmp_path):
    from PIL import Image

    data = RNG.integers(0, 255, size=(10, 11, 3), dtype=np.uint8)
    Image.fromarray(data).save(tmp_path / "rgb.png")
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path / "rgb.png")
    message = str(info.value)
    assert "YXS" in message and "RGB" in message and "3 samples" in message
    assert "grayscale" in message
    loaded = read_image(tmp_path / "rgb.png", allow_channels=True)
    assert loaded.axes == "CYX"
    np.testing.assert_array_equal(loaded.data, data.transpose(2, 0, 1))
    assert loaded.spatial_shape() == (10, 11)


def test_jpeg_read(tmp_path):
    from PIL import Image

    data = np.full((16, 16), 128, np.uint8)
    Image.fromarray(data).save(tmp_path / "img.jpg", quality=95)
    loaded = read_image(tmp_path / "img.jpg")
    assert loaded.axes == "YX" and loaded.data.shape == (16, 16)
    assert abs(int(loaded.data.mean()) - 128) <= 2


# --- NIfTI ----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip_zyx_order_and_spacing(tmp_path, suffix):
    import nibabel

    xyz = RNG.integers(-1000, 2000, size=(7, 6, 5), dtype=np.int16)  # nibabel order x, y, z
    image = nibabel.Nifti1Image(xyz, affine=np.diag([0.8, 0.9, 2.5, 1.0]))
    image.header.set_zooms((0.8, 0.9, 2.5))
    image.header.set_xyzt_units("mm")
    path = tmp_path / f"ct{suffix}"
    nibabel.save(image, path)

    loaded = read_image(path)
    assert loaded.axes == "ZYX"
    assert loaded.data.shape == (5, 6, 7)
    assert loaded.data.dtype == np.int16  # stored Hounsfield values kept as stored
    np.testing.assert_array_equal(loaded.data, xyz.transpose(2, 1, 0))
    assert_voxel_size(loaded.voxel_size, (2.5, 0.9, 0.8))
    assert loaded.unit == "mm"


def test_nifti_scaling_applied_when_not_identity(tmp_path):
    import nibabel

    xyz = np.arange(24, dtype=np.int16).reshape(4, 3, 2)
    image = nibabel.Nifti1Image(xyz, affine=np.eye(4))
    image.header.set_slope_inter(2.0, -1024.0)
    nibabel.save(image, tmp_path / "scaled.nii")
    loaded = read_image(tmp_path / "scaled.nii")
    assert loaded.data.dtype == np.float32
    np.testing.assert_allclose(loaded.data, xyz.transpose(2, 1, 0) * 2.0 - 1024.0)


def test_nifti_4d_refused_as_time_series(tmp_path):
    import nibabel

    nibabel.save(nibabel.Nifti1Image(np.zeros((4, 4, 3, 2), np.float32), np.eye(4)), tmp_path / "fmri.nii")
    with pytest.raises(ImageReadError, match=r"T=2.*time series"):
        read_image(tmp_path / "fmri.nii")


# --- DICOM ----------------------------------------------------------------------------------


def _write_ct_slice(path, pixels, z, instance, *, slope=1.0, intercept=-1024.0, series_uid="1.2.3"):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [-10.0, -20.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.6, 0.7]  # row spacing (y), column spacing (x)
    ds.SliceThickness = 1.25
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def test_dicom_series_folder_sorted_rescaled_to_hu_with_spacing(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    n_slices = 5
    raw = RNG.integers(0, 3000, size=(n_slices, 6, 8), dtype=np.uint16)
    z_positions = [100.0 + 2.0 * k for k in range(n_slices)]
    names = [f"IM{k:03d}.dcm" for k in range(n_slices)]
    random.Random(1).shuffle(names)  # file order no longer matches slice order
    # instance numbers reversed too: sorting must follow the positions
    for k in range(n_slices):
        _write_ct_slice(folder / names[k], raw[k], z_positions[k], instance=n_slices - k)
    (folder / "notes.txt").write_text("not dicom")  # ignored

    loaded = read_image(folder)
    assert loaded.axes == "ZYX"
    assert loaded.data.shape == (n_slices, 6, 8)
    np.testing.assert_array_equal(loaded.data, raw.astype(np.int32) - 1024)
    assert loaded.data.dtype == np.int16
    assert_voxel_size(loaded.voxel_size, (2.0, 0.6, 0.7))
    assert loaded.unit == "mm"


def test_dicom_non_integer_slope_gives_float(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    raw = np.arange(2 * 3 * 4, dtype=np.uint16).reshape(2, 3, 4)
    for k in range(2):
        _write_ct_slice(folder / f"s{k}", raw[k], 5.0 * k, instance=k + 1, slope=0.5, intercept=-10)
    loaded = read_image(folder)
    assert loaded.data.dtype == np.float32
    np.testing.assert_allclose(loaded.data, raw * 0.5 - 10)
    assert_voxel_size(loaded.voxel_size, (5.0, 0.6, 0.7))


def test_folder_without_dicom_and_with_two_series(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("hello")
    with pytest.raises(ImageReadError, match="no DICOM"):
        read_image(empty)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _write_ct_slice(mixed / "a.dcm", np.zeros((4, 4)), 0.0, 1, series_uid="1.1")
    _write_ct_slice(mixed / "b.dcm", np.zeros((4, 4)), 1.0, 2, series_uid="1.2")
    with pytest.raises(ImageReadError, match="2 DICOM series"):
        read_image(mixed)


# --- errors ---------------------------------------------------------------------------------


def test_missing_file_message(tmp_path):
    with pytest.raises(ImageReadError, match=r"^file not found: .*nope\.tif$"):
        read_image(tmp_path / "nope.tif")


def test_corrupt_file_message(tmp_path):
    path = tmp_path / "broken.tif"
    path.write_bytes(b"this is not a tiff at all" * 10)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(f"cannot read {path}: ")
    assert "\n" not in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", ["broken.png", "broken.nii.gz"])
def test_corrupt_other_formats_message(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x00garbage" * 20)
    with pytest.raises(ImageReadError, match="^cannot read "):
        read_image(tmp_path / name)


def test_unsupported_suffix_message(tmp_path):
    path = tmp_path / "data.xyz"
    path.write_text("x")
    with pytest.raises(ImageReadError, match=r"unsupported file type '\.xyz'.*supported: .*\.tif"):
        read_image(path)


# --- writing --------------------------------------------------------------------------------


def test_atomic_write_failure_leaves_existing_file_and_no_temp(tmp_path, monkeypatch):
    out = tmp_path / "labels.tif"
    write_labels_tiff(out, np.ones((4, 5), np.uint8))
    before = out.read_bytes()

    def failing_imwrite(file, *args, **kwargs):
        with open(file, "wb") as handle:  # half a file, then a crash
            handle.write(b"II*\x00partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(writers.tifffile, "imwrite", failing_imwrite)
    with pytest.raises(RuntimeError, match="disk full"):
        write_labels_tiff(out, np.full((4, 5), 7, np.uint8))
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.tif"]


def test_atomic_write_keyboard_interrupt_and_new_file(tmp_path):
    def interrupted(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "new.bin", interrupted)
    assert list(tmp_path.iterdir()) == []

    seen = []
    result = atomic_write(tmp_path / "new.bin", lambda tmp: (seen.append(tmp), tmp.write_bytes(b"ok")))
    assert result == tmp_path / "new.bin"
    assert result.read_bytes() == b"ok"
    assert seen[0].parent == tmp_path and seen[0].suffix == ".bin"
    assert list(tmp_path.iterdir()) == [result]
    assert result.stat().st_mode & 0o777 != 0o600  # not mkstemp's private mode


def test_refuses_to_overwrite_input_image(tmp_path):
    source = tmp_path / "input.tif"
    write_image_tiff(source, np.zeros((3, 3), np.uint8))
    before = source.read_bytes()
    alias = tmp_path / "sub" / ".." / "input.tif"
    (tmp_path / "sub").mkdir()
    for target in (source, alias):
        with pytest.raises(ValueError, match="refusing to overwrite the input image"):
            write_labels_tiff(target, np.ones((3, 3), np.uint8), input_path=source)
    with pytest.raises(ValueError, match="refusing to overwrite the input image"):
        write_tiff_atomic(str(source), np.ones((3, 3), np.float32), input_path=str(source))
    assert source.read_bytes() == before
    os.symlink(source, tmp_path / "link.tif")
    with pytest.raises(ValueError, match="refusing to overwrite the input image"):
        write_labels_tiff(tmp_path / "link.tif", np.ones((3, 3), np.uint8), input_path=source)


def test_input_arrays_are_not_modified(tmp_path):
    labels = RNG.integers(0, 300, size=(3, 8, 9)).astype(np.int64)
    labels_copy = labels.copy()
    probabilities = RNG.random((3, 8, 9))  # float64, written as float32
    probabilities_copy = probabilities.copy()
    write_labels_tiff(tmp_path / "l.tif", labels, voxel_size=(1, 1, 1))
    write_image_tiff(tmp_path / "p.tif", probabilities, voxel_size=(1, 1, 1))
    np.testing.assert_array_equal(labels, labels_copy)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(probabilities, probabilities_copy)
    assert probabilities.dtype == np.float64
    np.testing.assert_allclose(read_image(tmp_path / "p.tif").data, probabilities.astype(np.float32))


@pytest.mark.parametrize(
    "max_label, dtype, imagej",
    [(0, np.uint8, True), (200, np.uint8, True), (255, np.uint8, True), (256, np.uint16, True),
     (1000, np.uint16, True), (65535, np.uint16, True), (70000, np.uint32, False),
     (2**32, np.uint64, False)],
)
def test_labels_smallest_dtype_and_read_back(tmp_path, max_label, dtype, imagej):
    assert smallest_label_dtype(max_label) == np.dtype(dtype)
    labels = np.zeros((3, 6, 7), np.int64)
    labels[1, 2, 3] = max_label
    labels[0, 0, 0] = 1 if max_label else 0
    voxel_size = (2.0, 0.35, 0.15)
    out = write_labels_tiff(tmp_path / "labels.tif", labels, voxel_size=voxel_size, unit="um")
    with tifffile.TiffFile(out) as tif:
        assert tif.is_imagej == imagej
        assert tif.pages[0].dtype == np.dtype(dtype)
    loaded = read_image(out)
    assert loaded.data.dtype == np.dtype(dtype)
    assert loaded.axes == "ZYX"
    np.testing.assert_array_equal(loaded.data, labels)
    assert_voxel_size(loaded.voxel_size, voxel_size)
    assert loaded.unit == "um"


def test_labels_2d_and_bool_and_invalid(tmp_path):
    out = write_labels_tiff(tmp_path / "mask.tif", np.eye(4, dtype=bool), voxel_size=(0.5, 0.25))
    loaded = read_image(out)
    assert loaded.axes == "YX" and loaded.data.dtype == np.uint8
    assert_voxel_size(loaded.voxel_size, (0.5, 0.25))
    with pytest.raises(ValueError, match=">= 0"):
        write_labels_tiff(tmp_path / "neg.tif", np.array([[-1, 2]]))
    with pytest.raises(ValueError, match="integers"):
        write_labels_tiff(tmp_path / "float.tif", np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="spatial axes"):
        write_labels_tiff(tmp_path / "vs.tif", np.zeros((2, 2), np.uint8), voxel_size=(1, 1, 1))
    with pytest.raises(ValueError):
        smallest_label_dtype(-1)
    assert not (tmp_path / "neg.tif").exists() and not (tmp_path / "vs.tif").exists()


def test_probability_map_uint8_and_channels_round_trip(tmp_path):
    probs = RNG.integers(0, 255, size=(2, 3, 5, 6), dtype=np.uint8)  # CZYX
    out = write_image_tiff(tmp_path / "probs.tif", probs, voxel_size=(1.5, 0.5, 0.5), axes="CZYX")
    with pytest.raises(ImageReadError, match="C=2"):
        read_image(out)
    loaded = read_image(out, allow_channels=True)
    assert loaded.axes == "CZYX"
    np.testing.assert_array_equal(loaded.data, probs)
    assert_voxel_size(loaded.voxel_size, (1.5, 0.5, 0.5))


def test_plain_tiff_writer_round_trip(tmp_path):
    data = RNG.integers(-5, 5, size=(2, 4, 5)).astype(np.int32)
    out = write_tiff_atomic(tmp_path / "plain.tif", data, voxel_size=(3.0, 0.2, 0.1), unit="nm",
                            imagej=False, compression=None)
    loaded = read_image(out)
    np.testing.assert_array_equal(loaded.data, data)
    assert loaded.unit == "nm"
    assert_voxel_size(loaded.voxel_size, (3.0, 0.2, 0.1))


def test_loaded_image_spatial_shape():
    image = LoadedImage(np.zeros((2, 3, 4, 5)), "CZYX", (1.0, 1.0, 1.0), "um", None)
    assert image.spatial_shape() == (3, 4, 5)
    assert image.spatial_axes == "ZYX"
