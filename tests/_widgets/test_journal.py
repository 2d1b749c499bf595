"""Nothing lost: painting is journaled within 2 s, a new viewer offers it back, Export and Save
mark it clean, and a lost fine-tuned version comes back in the model list."""

from __future__ import annotations

import time

import numpy as np
import tifffile

from napari_unet._widgets._launch import PLUGIN
from napari_unet.io import journal as jr
from napari_unet.io import recovery as rc

from .conftest import blobs, make_tiny_model, wait_idle


def _image_file(tmp_path):
    image, _ = blobs((8, 48, 48))
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, image)
    return path


def _open(make_napari_viewer, path):
    from napari_unet._widgets._edit import EditWidget

    viewer = make_napari_viewer()
    dock = EditWidget(viewer)
    viewer.window.add_dock_widget(dock, name="Edit")
    image = viewer.open(str(path), plugin=PLUGIN)[0]
    return viewer, image


def _read(folder):
    """The journal's labels (retried: the writer may delete old files while this reads)."""
    for _ in range(50):
        try:
            return jr.LabelsJournal.load(folder).read_labels()
        except ValueError:
            time.sleep(0.01)
    raise AssertionError("the journal stays unreadable")


def _unsaved(path, image):
    return rc.find_journals(str(path), jr.content_hash(image.data))


def test_painting_is_journaled_and_restored_in_a_new_viewer(make_napari_viewer, qtbot, tmp_path,
                                                            monkeypatch):
    from napari_unet._widgets import _journal
    from napari_unet._widgets._state import corrected_slices, set_corrected_slices

    path = _image_file(tmp_path)
    viewer, image = _open(make_napari_viewer, path)
    labels = viewer.add_labels(np.zeros(image.data.shape, np.uint16), name="stack labels")
    labels.brush_size = 5
    labels.paint((3, 20, 20), 7)
    labels.paint((5, 30, 10), 9)
    assert corrected_slices(labels) == [3, 5]
    set_corrected_slices(labels, [3, 5, (1, 20)])  # a y plane corrected too
    # journaled within 2 s of the strokes
    qtbot.waitUntil(lambda: bool(_unsaved(path, image))
                    and np.array_equal(_read(_unsaved(path, image)[0].folder), labels.data),
                    timeout=2000)
    journal = _unsaved(path, image)[0]
    painted = np.array(labels.data)

    # a new viewer opening the same image offers the labels back
    asked = []
    monkeypatch.setattr(_journal, "ask_restore", lambda parent, text: asked.append(text) or True)
    viewer2, image2 = _open(make_napari_viewer, path)
    qtbot.waitUntil(lambda: "stack labels" in viewer2.layers, timeout=10000)
    assert len(asked) == 1 and "'stack labels'" in asked[0]
    restored = viewer2.layers["stack labels"]
    np.testing.assert_array_equal(restored.data, painted)
    assert corrected_slices(restored) == [3, 5, (1, 20)]
    # the restored layer goes on being journaled
    restored.paint((6, 10, 10), 4)
    qtbot.waitUntil(lambda: _read(journal.folder)[6, 10, 10] == 4,
                    timeout=5000)
    assert jr.LabelsJournal.load(journal.folder).corrected == [3, 5, 6, (1, 20)]


def test_declining_discards_and_another_image_is_not_offered(make_napari_viewer, qtbot, tmp_path,
                                                             monkeypatch):
    from napari_unet._widgets import _journal

    path = _image_file(tmp_path)
    viewer, image = _open(make_napari_viewer, path)
    labels = viewer.add_labels(np.zeros(image.data.shape, np.uint8), name="mine")
    labels.paint((2, 5, 5), 1)
    qtbot.waitUntil(lambda: bool(_unsaved(path, image)), timeout=5000)

    other = tmp_path / "other.tif"
    tifffile.imwrite(other, blobs((8, 48, 48), seed=3)[0])
    asked = []
    monkeypatch.setattr(_journal, "ask_restore", lambda parent, text: asked.append(text) or False)
    viewer2, _ = _open(make_napari_viewer, other)
    qtbot.wait(100)
    assert asked == []  # a different image: nothing to offer
    viewer2.open(str(path), plugin=PLUGIN)
    qtbot.waitUntil(lambda: len(asked) == 1, timeout=10000)
    assert "mine" not in viewer2.layers
    assert _unsaved(path, image) == []  # discarded


def test_edit_operations_and_export_mark_clean(make_napari_viewer, qtbot, tmp_path):
    from napari_unet._widgets._export import ExportWidget
    from napari_unet._widgets._history import history_for

    path = _image_file(tmp_path)
    viewer, image = _open(make_napari_viewer, path)
    labels = viewer.add_labels(np.zeros(image.data.shape, np.uint16), name="stack labels")
    values = np.full((2, 4, 4), 5, np.uint16)
    history_for(labels).apply((slice(1, 3), slice(0, 4), slice(0, 4)), values, "fill")
    qtbot.waitUntil(lambda: bool(_unsaved(path, image)), timeout=5000)
    journal = _unsaved(path, image)[0]
    qtbot.waitUntil(lambda: _read(journal.folder)[2, 3, 3] == 5,
                    timeout=5000)

    export = ExportWidget(viewer)
    viewer.window.add_dock_widget(export, name="Export")
    export.labels_combo.setCurrentText("stack labels")
    export.export(tmp_path / "out.tif")
    wait_idle(qtbot, export)
    qtbot.waitUntil(lambda: _unsaved(path, image) == [], timeout=5000)
    assert jr.LabelsJournal.load(journal.folder).clean
    # painting after the export makes it unsaved again; File > Save marks it clean
    labels.paint((0, 1, 1), 2)
    qtbot.waitUntil(lambda: bool(_unsaved(path, image)), timeout=5000)
    viewer.layers.selection = {labels}
    viewer.layers.save(str(tmp_path / "saved.tif"), selected=True, plugin=PLUGIN)
    qtbot.waitUntil(lambda: _unsaved(path, image) == [], timeout=5000)


def test_a_lost_fine_tune_comes_back_as_recovered(make_napari_viewer, qtbot, registry, tmp_path):
    from napari_unet._widgets import _rescue
    from napari_unet._widgets._segment import SegmentWidget

    class FakeTrainer:  # Trainer's public API: best_model()
        def best_model(self):
            model = make_tiny_model(2, name="nuclei")
            model.version = 2
            return model

    rescue = _rescue.FineTuneRescue("nuclei v1", interval=0.0)
    rescue.progress(FakeTrainer())
    rescue.wait()
    assert rescue.saves == 1 and rc.read_info(rescue.folder)["state"] == "running"
    _rescue._RESCUES.discard(rescue)
    # "the app died": a new session's Segment dock lists the version
    viewer = make_napari_viewer()
    dock = SegmentWidget(viewer)
    viewer.window.add_dock_widget(dock, name="Segment")
    assert "nuclei v2 (recovered)" in registry
    texts = [dock.model_combo.itemText(i) for i in range(dock.model_combo.count())]
    assert any("nuclei v2 (recovered)" in t for t in texts)
    assert registry.get("nuclei v2 (recovered)").version == 2
    assert rc.recoverable_checkpoints() == []  # offered once


def test_a_saved_fine_tune_is_not_recovered(tmp_path):
    from napari_unet._widgets import _rescue

    model = make_tiny_model(2, name="cells")
    rescue = _rescue.FineTuneRescue("cells v1")
    rescue.finished(model)
    rescue.wait()
    assert [info["label"] for _, info in rc.recoverable_checkpoints()] == [model.label]
    _rescue.model_saved(model)
    assert rc.recoverable_checkpoints() == []


def test_a_renamed_layer_keeps_one_journal(make_napari_viewer, qtbot, tmp_path):
    from napari_unet._widgets._journal import install_journal

    path = _image_file(tmp_path)
    viewer, image = _open(make_napari_viewer, path)
    labels = viewer.add_labels(np.zeros(image.data.shape, np.uint8), name="first")
    labels.paint((1, 5, 5), 3)
    assert install_journal(viewer).flush()
    labels.name = "second"
    assert install_journal(viewer).flush()
    found = _unsaved(path, image)
    assert [j.layer_name for j in found] == ["second"]
    assert _read(found[0].folder)[1, 5, 5] == 3


def test_the_fine_tune_is_saved_every_interval_not_every_iteration(tmp_path):
    from napari_unet._widgets import _rescue

    model = make_tiny_model(2, name="cells")
    calls = []

    class FakeTrainer:
        def best_model(self):
            calls.append(time.monotonic())
            return None if len(calls) == 1 else model  # None: before the first iteration

    rescue = _rescue.FineTuneRescue("cells v1", interval=3600.0)
    for _ in range(20):
        rescue.progress(FakeTrainer())
        rescue.wait()
    assert len(calls) == 2 and rescue.saves == 1  # retried once after the None, then waits
