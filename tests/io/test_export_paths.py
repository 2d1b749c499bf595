"""Where exports and checkpoints are written."""

from __future__ import annotations

from pathlib import Path

import pytest

from napari_unet.io.export_paths import (
    check_label_suffix,
    checkpoint_file_name,
    checkpoint_path,
    default_export_path,
    export_path,
    file_stem,
    probability_path,
)


def test_probability_path():
    assert probability_path(Path("/a/mask.tif")) == Path("/a/mask_probabilities.tif")
    assert probability_path(Path("/a/x.OME.TIFF")) == Path("/a/x_probabilities.tif")
    assert probability_path(Path("/a/x.tiff")) == Path("/a/x_probabilities.tif")
    assert probability_path(Path("/a/x")) == Path("/a/x_probabilities.tif")
    assert probability_path(Path("/a/x.ome.zarr")) == Path("/a/x_probabilities.tif")


def test_default_and_typed_export_paths(tmp_path, monkeypatch):
    assert file_stem("nuclei labels") == "nuclei_labels"
    source = tmp_path / "data" / "stack.tif"
    assert default_export_path("stack labels", source) == tmp_path / "data" / "stack_labels.tif"
    assert default_export_path("x", None, tmp_path) == tmp_path / "x.tif"
    monkeypatch.chdir(tmp_path)
    assert default_export_path("x", None) == tmp_path / "x.tif"
    assert export_path("") == Path("labels.tif") and export_path(None) == Path("labels.tif")
    assert export_path("  out.tif ") == Path("out.tif")
    assert export_path("~/out.tif") == Path.home() / "out.tif"
    assert export_path(tmp_path / "y.tif") == tmp_path / "y.tif"


def test_suffixes():
    assert check_label_suffix(Path("a.TIF")) == Path("a.TIF")
    assert check_label_suffix(Path("a.ome.zarr")) == Path("a.ome.zarr")
    with pytest.raises(ValueError, match=r"\.tif"):
        check_label_suffix(Path("a.zarr"))  # a plain zarr group is not a labels export
    with pytest.raises(ValueError, match=r"\.tif"):
        check_label_suffix(Path("a.png"))
    assert checkpoint_path("m") == Path("m.pt")
    assert checkpoint_path("m.pth") == Path("m.pth")
    assert checkpoint_path("dir/m.zip") == Path("dir/m.pt")
    assert checkpoint_file_name("tiny v2") == "tiny_v2.pt"
    assert checkpoint_file_name(None) == "model.pt"
