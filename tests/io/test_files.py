"""Damaged inputs and failing writes in napari_unet.io (issue 14)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_unet.io import files, writers
from napari_unet.io.files import atomic_write, check_output_path
from napari_unet.io.formats import ImageReadError, OutputPathError
from napari_unet.io.lazy import open_lazy
from napari_unet.io.readers import read_image
from napari_unet.io.writers import write_labels_tiff

STACK = np.random.default_rng(0).integers(0, 255, (8, 32, 32), dtype=np.uint8)


def _truncated(tmp_path: Path, kind: str) -> Path:
    """A TIFF cut short: an ImageJ hyperstack, a plain multi-page file, or a compressed file
    missing only the end of its last page."""
    full = tmp_path / f"{kind}.tif"
    if kind == "imagej":
        tifffile.imwrite(full, STACK, imagej=True, metadata={"axes": "ZYX"})
        keep = full.stat().st_size // 2
    elif kind == "plain":
        tifffile.imwrite(full, STACK)
        keep = full.stat().st_size // 2
    else:
        tifffile.imwrite(full, STACK, compression="zlib")
        keep = full.stat().st_size - 200
    cut = tmp_path / f"{kind}_cut.tif"
    cut.write_bytes(full.read_bytes()[:keep])
    return cut


@pytest.mark.parametrize("kind", ["imagej", "plain", "compressed_tail"])
@pytest.mark.parametrize("opener", [open_lazy, read_image])
def test_truncated_tiff_is_refused_when_opened(tmp_path, caplog, kind, opener):
    cut = _truncated(tmp_path, kind)
    with pytest.raises(ImageReadError, match=r"the TIFF file is truncated or damaged") as info:
        opener(cut)
    assert "\n" not in str(info.value) and str(cut) in str(info.value)
    assert not [r for r in caplog.records if r.name.startswith("tifffile")]  # no log line


def test_intact_tiffs_still_open_lazily_and_eagerly(tmp_path):
    for kind, kwargs in (("imagej", {"imagej": True, "metadata": {"axes": "ZYX"}}), ("plain", {}),
                         ("zlib", {"compression": "zlib"})):
        path = tmp_path / f"{kind}.tif"
        tifffile.imwrite(path, STACK, **kwargs)
        np.testing.assert_array_equal(open_lazy(path).data.compute(), STACK)
        np.testing.assert_array_equal(read_image(path).data, STACK)


def test_disk_full_during_write_names_the_users_file_and_leaves_nothing(tmp_path, monkeypatch):
    def full(file, *args, **kwargs):
        Path(file).write_bytes(b"II*\x00partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(file))

    monkeypatch.setattr(writers.tifffile, "imwrite", full)
    out = tmp_path / "labels.tif"
    with pytest.raises(OSError) as info:
        write_labels_tiff(out, np.ones((4, 5), np.uint8))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(out)
    assert list(tmp_path.iterdir()) == []


def test_missing_folder_error_names_the_users_file_not_the_temporary_one(tmp_path):
    out = tmp_path / "nodir" / "x.tif"
    with pytest.raises(FileNotFoundError) as info:
        atomic_write(out, lambda tmp: tmp.write_bytes(b"x"))
    assert info.value.filename == str(out)
    assert ".x." not in str(info.value)


def test_atomic_write_into_a_folder_is_an_is_a_directory_error(tmp_path):
    with pytest.raises(IsADirectoryError) as info:
        atomic_write(tmp_path, lambda tmp: None)
    assert info.value.filename == str(tmp_path)


def test_check_output_path_cases(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    (tmp_path / "dir.tif").mkdir()
    assert check_output_path(tmp_path / "ok.tif") == tmp_path / "ok.tif"
    assert check_output_path(tmp_path / "new" / "deeper" / "m.pt", create_parent=True)
    assert check_output_path(tmp_path / "store.zarr", folder=True)
    assert check_output_path(tmp_path / "dir.tif", folder=True)  # an existing store: resumed
    cases = {
        tmp_path / "dir.tif": ({}, "it is a folder; give a file name"),
        blocker / "o.tif": ({}, f"{blocker} is a file, not a folder"),
        blocker / "a" / "m.pt": ({"create_parent": True}, f"{blocker} is a file, not a folder"),
        tmp_path / "nodir" / "x.tif": ({}, f"the folder {tmp_path / 'nodir'} does not exist"),
        blocker: ({"folder": True}, "a file of that name exists (expected a folder)"),
    }
    for path, (options, reason) in cases.items():
        with pytest.raises(OutputPathError) as info:
            check_output_path(path, **options)
        assert str(info.value) == f"cannot write {path}: {reason}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.tif", "file"]  # probes removed

    def read_only(folder):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder / ".probe"))

    monkeypatch.setattr(files, "_probe_writable", read_only)
    with pytest.raises(OutputPathError, match=r"Read-only file system"):
        check_output_path(tmp_path / "ok.tif")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_output_path_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputPathError, match="Permission denied"):
            check_output_path(folder / "x.tif")
    finally:
        folder.chmod(0o755)
