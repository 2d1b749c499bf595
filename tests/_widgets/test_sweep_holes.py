"""The holes a bad-input sweep found in the docks (issue 23, cases G1-G5): each ends with one
line in the dock's status line, no traceback, no layer or file changed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_unet.io.readers import read_image

from .conftest import blobs, click, wait_idle


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _export_dock(viewer):
    from napari_unet._widgets._export import ExportWidget

    widget = ExportWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Export")
    return widget


@pytest.fixture
def questions(monkeypatch):
    """``QMessageBox.question`` answered from a list (default No); the questions asked."""
    from qtpy.QtWidgets import QMessageBox

    asked: list[str] = []
    answers: list = []

    def question(parent, title, text, *args, **kwargs):
        asked.append(text)
        return answers.pop(0) if answers else QMessageBox.No

    monkeypatch.setattr(QMessageBox, "question", staticmethod(question))
    return asked, answers


@pytest.fixture
def save_dialog(monkeypatch):
    """``QFileDialog.getSaveFileName`` returning the next of ``chosen`` ('' = cancelled);
    the suggested paths."""
    from qtpy.QtWidgets import QFileDialog

    suggested: list[str] = []
    chosen: list[str] = []

    def dialog(parent, caption, directory="", *args, **kwargs):
        suggested.append(directory)
        return (chosen.pop(0) if chosen else "", "TIFF (*.tif *.tiff)")

    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(dialog))
    return suggested, chosen


# --- G1: never over an opened image; ask before overwriting -------------------------------


def test_g1_export_never_overwrites_an_opened_layers_file(make_napari_viewer, qtbot, tmp_path,
                                                          questions):
    from qtpy.QtWidgets import QMessageBox

    raw = tmp_path / "raw.tif"
    image, labels = blobs((32, 32))
    tifffile.imwrite(raw, image)
    before = digest(raw)
    viewer = make_napari_viewer()
    viewer.open(str(raw), plugin="napari")  # any reader: napari sets layer.source.path
    assert Path(viewer.layers[0].source.path) == raw
    viewer.add_labels(labels, name="labels")
    widget = _export_dock(viewer)
    asked, answers = questions
    answers.append(QMessageBox.Yes)  # even a yes does not overwrite the opened image
    widget.path_edit.setText(str(raw))
    click(qtbot, widget, "Export")
    wait_idle(qtbot, widget)
    assert digest(raw) == before
    assert "raw.tif" in widget.status.text() and "choose another file" in widget.status.text()


def test_g1_export_asks_before_overwriting_a_file(make_napari_viewer, qtbot, tmp_path, questions):
    from qtpy.QtWidgets import QMessageBox

    other = tmp_path / "other.tif"
    tifffile.imwrite(other, np.arange(16, dtype=np.uint8).reshape(4, 4))
    before = digest(other)
    viewer = make_napari_viewer()
    _, labels = blobs((32, 32))
    viewer.add_labels(labels, name="labels")
    widget = _export_dock(viewer)
    asked, answers = questions
    widget.path_edit.setText(str(other))
    click(qtbot, widget, "Export")  # answered No
    wait_idle(qtbot, widget)
    assert len(asked) == 1 and "other.tif" in asked[0]
    assert digest(other) == before and "Not exported" in widget.status.text()
    answers.append(QMessageBox.Yes)
    click(qtbot, widget, "Export")
    wait_idle(qtbot, widget)
    assert len(asked) == 2
    np.testing.assert_array_equal(read_image(other).data, labels)


# --- G2: the current layer's name, and a save dialog ------------------------------------------


def test_g2_export_without_a_typed_name_suggests_the_current_layer(make_napari_viewer, qtbot,
                                                                   tmp_path, save_dialog,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    viewer = make_napari_viewer()
    _, labels = blobs((32, 32))
    first = viewer.add_labels(labels, name="first")
    widget = _export_dock(viewer)
    viewer.layers.remove(first)
    viewer.add_labels(labels, name="nuclei labels")
    widget.labels_combo.setCurrentText("nuclei labels")
    assert Path(widget.path_edit.text()).name == "nuclei_labels.tif"
    suggested, chosen = save_dialog
    click(qtbot, widget, "Export")  # cancelled: nothing written
    assert Path(suggested[-1]).name == "nuclei_labels.tif"
    assert list(tmp_path.glob("*.tif")) == [] and "no file chosen" in widget.status.text()
    chosen.append(str(tmp_path / "picked.tif"))
    click(qtbot, widget, "Export")
    wait_idle(qtbot, widget)
    assert sorted(p.name for p in tmp_path.glob("*.tif")) == ["picked.tif"]


# --- G4: 4D labels, a missing folder ------------------------------------------------------------


def test_g4_export_of_4d_labels_is_plain_words(make_napari_viewer, qtbot, tmp_path, notifications):
    viewer = make_napari_viewer()
    viewer.add_labels(np.ones((2, 3, 8, 8), np.uint8), name="tzyx")
    widget = _export_dock(viewer)
    widget.path_edit.setText(str(tmp_path / "out.tif"))
    click(qtbot, widget, "Export")
    wait_idle(qtbot, widget)
    text = widget.status.text()
    assert "4D" in text and "axes=" not in text and "one time point" in text
    assert not (tmp_path / "out.tif").exists() and widget.export_button.isEnabled()


def test_g4_export_into_a_missing_folder_is_plain_words(make_napari_viewer, qtbot, tmp_path,
                                                        notifications):
    viewer = make_napari_viewer()
    viewer.add_labels(np.ones((8, 8), np.uint8), name="labels")
    widget = _export_dock(viewer)
    widget.path_edit.setText(str(tmp_path / "nowhere" / "out.tif"))
    click(qtbot, widget, "Export")
    wait_idle(qtbot, widget)
    text = widget.status.text()
    assert "Errno" not in text and "does not exist" in text and "nowhere" in text
    assert not (tmp_path / "nowhere").exists()


# --- G3: Segment errors in the dock ---------------------------------------------------------------


def _segment_dock(viewer):
    from napari_unet._widgets._segment import SegmentWidget

    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    return widget


def test_g3_segment_errors_show_in_the_dock_and_reset_the_progress(
        make_napari_viewer, qtbot, registry, model_2d_path, model_3d_path, notifications):
    viewer = make_napari_viewer()
    image, _ = blobs((48, 48))
    viewer.add_image(image, name="flat")
    widget = _segment_dock(viewer)
    widget.load_model_file(model_2d_path)
    click(qtbot, widget, "Segment")
    wait_idle(qtbot, widget)
    assert "Done" in widget.status.text() and widget.progress_bar.value() > 0
    labels = viewer.layers["flat labels"]
    before = labels.data.copy()
    # a 3D model on a 2D image
    widget.load_model_file(model_3d_path)
    click(qtbot, widget, "Segment")
    assert widget.worker is None
    text = widget.status.text()
    assert "3D model" in text and "2D model" in text and "Done" not in text
    assert widget.progress_bar.value() == 0
    np.testing.assert_array_equal(labels.data, before)
    # no layers at all
    widget.load_model_file(model_2d_path)
    viewer.layers.clear()
    click(qtbot, widget, "Segment")
    text = widget.status.text()
    assert "Open an image" in text and "Done" not in text
    assert widget.progress_bar.value() == 0


# --- G5: closing the viewer (or the dock) during a fine-tune -----------------------------------


@pytest.mark.parametrize("how", ["viewer", "dock"])
def test_g5_closing_during_a_fine_tune_stops_cleanly(make_napari_viewer, qtbot, registry,
                                                     model_2d_path, how):
    import sys

    from qtpy.QtCore import QCoreApplication, QEvent, QThreadPool
    from qtpy.QtWidgets import QApplication

    from napari_unet._widgets._finetune import FineTuneWidget

    raised: list[str] = []
    real_hook = sys.excepthook
    sys.excepthook = lambda kind, value, tb: raised.append(f"{kind.__name__}: {value}")
    viewer = make_napari_viewer()
    image, labels = blobs((48, 48))
    viewer.add_image(image, name="img")
    viewer.add_labels(labels, name="img labels")
    segment = _segment_dock(viewer)
    widget = FineTuneWidget(viewer)
    dock = viewer.window.add_dock_widget(widget, name="Fine-tune")
    segment.load_model_file(model_2d_path)
    widget.time_spin.setValue(60)
    widget.config_overrides = {"batch_size": 1}
    click(qtbot, widget, "Fine-tune")
    qtbot.waitUntil(lambda: widget.last_stats is not None, timeout=60_000)
    trainer = widget.training_job
    try:
        if how == "viewer":
            viewer.close()
        else:  # the dock deleted (as its window's children are when the window goes)
            viewer.window.remove_dock_widget(dock)
            widget.deleteLater()
            QCoreApplication.sendPostedEvents(None, QEvent.DeferredDelete)
        for _ in range(5):
            QApplication.processEvents()
        assert QThreadPool.globalInstance().waitForDone(30_000)  # stopped, well before 60 s
        for _ in range(20):
            QApplication.processEvents()
    finally:
        sys.excepthook = real_hook
    assert trainer._stop.is_set() or how == "viewer"
    assert trainer._state["seconds"] < 30
    assert not [m for m in raised if "deleted" in m], raised


def test_g1_export_asks_before_replacing_an_ome_zarr(make_napari_viewer, qtbot, tmp_path,
                                                     questions):
    pytest.importorskip("ome_zarr")
    from qtpy.QtWidgets import QMessageBox

    viewer = make_napari_viewer()
    image, labels = blobs((32, 32))
    viewer.add_image(image, name="img")
    viewer.add_labels(labels, name="img labels")
    widget = _export_dock(viewer)
    widget.labels_combo.setCurrentText("img labels")
    target = tmp_path / "out.ome.zarr"
    widget.export(target)
    wait_idle(qtbot, widget)
    assert target.is_dir()
    before = sorted(p.name for p in target.rglob("*"))
    asked, answers = questions
    widget.export(target)  # answered No: left as it is
    wait_idle(qtbot, widget)
    assert len(asked) == 1 and "Not exported" in widget.status.text()
    assert sorted(p.name for p in target.rglob("*")) == before
    answers.append(QMessageBox.Yes)
    widget.export(target)
    wait_idle(qtbot, widget)
    assert len(asked) == 2 and "Wrote" in widget.status.text()
