"""Measurements dock: the table of a labels layer, its updates after edits, rows that take the
view to the object, sorting, and the CSV."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unet.io.table import read_csv

from .conftest import wait_idle


def _stack():
    labels = np.zeros((10, 40, 50), dtype=np.uint16)
    labels[1:3, 2:10, 2:10] = 3  # 2 x 8 x 8 = 128 voxels
    labels[5:9, 20:35, 30:45] = 7  # 4 x 15 x 15 = 900 voxels
    labels[6, 5:8, 40:44] = 9  # 12 voxels
    image = np.where(labels > 0, labels * 10.0, 1.0).astype(np.float32)
    return labels, image


@pytest.fixture
def dock(make_napari_viewer, qtbot):
    from napari_unet._widgets._measure import MeasureWidget

    viewer = make_napari_viewer()
    labels, image = _stack()
    viewer.add_image(image, name="cells", scale=(2.0, 0.5, 0.5))
    layer = viewer.add_labels(labels, name="cells labels", scale=(2.0, 0.5, 0.5),
                              translate=(10.0, 0.0, 0.0))
    widget = MeasureWidget(viewer)
    qtbot.addWidget(widget)
    qtbot.waitUntil(lambda: "label" in layer.features, timeout=30_000)
    wait_idle(qtbot, widget)
    return viewer, layer, widget


def test_table_is_the_layers_features_in_calibrated_units(dock):
    from qtpy.QtCore import Qt

    viewer, layer, widget = dock
    features = layer.features
    assert features["label"].tolist() == [3, 7, 9]
    assert features["volume"].tolist() == pytest.approx([128 * 0.5, 900 * 0.5, 12 * 0.5])
    assert features["centroid_z"].tolist()[0] == pytest.approx(10.0 + 1.5 * 2.0)
    assert features["mean_intensity"].tolist() == pytest.approx([30.0, 70.0, 90.0])
    assert widget.image_combo.currentText() == "cells"  # the image Segment named them after
    assert widget.model.rowCount() == 3
    headers = [widget.model.headerData(c, Qt.Horizontal)
               for c in range(widget.model.columnCount())]
    assert "volume [um^3]" in headers and "index" not in headers
    # napari's own lookup (status bar) finds the row of a label through the index column
    assert layer._label_index[7] == 1


def test_clicking_a_row_selects_the_label_and_centres_the_view(dock, qtbot):
    from qtpy.QtCore import Qt

    viewer, layer, widget = dock
    row = widget.model.row_of_label(7)
    rect = widget.view.visualRect(widget.model.index(row, 0))
    widget.show()
    qtbot.mouseClick(widget.view.viewport(), Qt.LeftButton, pos=rect.center())
    assert layer.selected_label == 7
    z_world = 10.0 + 6.5 * 2.0  # centroid slice 6.5 of label 7
    assert viewer.dims.point[0] == pytest.approx(z_world, abs=2.0)
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    assert tuple(camera.center[-2:]) == pytest.approx((27 * 0.5, 37 * 0.5), abs=0.01)


def test_sorting_by_a_column_orders_the_rows(dock):
    from qtpy.QtCore import Qt

    _viewer, _layer, widget = dock
    column = widget.model.columns.index("volume")
    widget.view.sortByColumn(column, Qt.DescendingOrder)
    assert [widget.model.label_at(r) for r in range(3)] == [7, 3, 9]
    widget.view.sortByColumn(column, Qt.AscendingOrder)
    assert [widget.model.label_at(r) for r in range(3)] == [9, 3, 7]


def test_an_edit_of_one_slice_remeasures_only_the_labels_it_touched(dock, qtbot, monkeypatch):
    from napari_unet._widgets import _measure
    from napari_unet._widgets._history import history_for

    _viewer, layer, widget = dock
    seen = []
    original = _measure.update_table

    def spy(table, labels, touched, *args):
        seen.append(list(touched))
        return original(table, labels, touched, *args)

    monkeypatch.setattr(_measure, "update_table", spy)
    after = np.array(layer.data[6], copy=True)
    after[after == 9] = 0  # erase label 9 in slice 6, grow label 7 there
    after[20:35, 25:30] = 7
    history_for(layer).apply((slice(6, 7),), after[None], "edit")
    qtbot.waitUntil(lambda: layer.features["label"].tolist() == [3, 7], timeout=30_000)
    wait_idle(qtbot, widget)
    assert seen == [[7, 9]]
    assert layer.features["voxels"].tolist() == [128, 900 + 15 * 5]


def test_a_finished_segment_run_remeasures_everything(dock, qtbot):
    from napari_unet._widgets._history import history_for

    _viewer, layer, widget = dock
    history = history_for(layer)
    history.busy = "Segment"
    layer.data[0, 30:40, 0:10] = 12  # a job writes into the layer
    qtbot.wait(600)
    assert 12 not in layer.features["label"].tolist()  # not while it runs
    history.busy = None
    qtbot.waitUntil(lambda: 12 in layer.features["label"].tolist(), timeout=30_000)
    wait_idle(qtbot, widget)


def test_napari_paint_updates_the_table(dock, qtbot):
    _viewer, layer, widget = dock
    layer.selected_label = 20
    layer.paint((0, 35, 45), 20)  # napari's brush (emits its paint event)
    qtbot.waitUntil(lambda: 20 in layer.features["label"].tolist(), timeout=30_000)
    wait_idle(qtbot, widget)


def test_save_csv_writes_the_table(dock, tmp_path):
    _viewer, _layer, widget = dock
    path = widget.save_csv(tmp_path / "cells.csv")
    table = read_csv(path)
    assert table["label"] == ["3", "7", "9"]
    assert [float(v) for v in table["volume [um^3]"]] == [64.0, 450.0, 6.0]
    assert "index" not in table


def test_export_also_writes_the_measurements_next_to_the_tiff(make_napari_viewer, qtbot, tmp_path):
    from napari_unet._widgets._export import ExportWidget

    viewer = make_napari_viewer()
    labels, image = _stack()
    viewer.add_image(image, name="cells", scale=(2.0, 0.5, 0.5))
    viewer.add_labels(labels, name="cells labels", scale=(2.0, 0.5, 0.5))
    widget = ExportWidget(viewer)
    qtbot.addWidget(widget)
    widget.measure_check.setChecked(True)
    widget.export(tmp_path / "cells.tif")
    wait_idle(qtbot, widget)
    table = read_csv(tmp_path / "cells_measurements.csv")
    assert table["label"] == ["3", "7", "9"]
    assert [float(v) for v in table["volume [um^3]"]] == [64.0, 450.0, 6.0]
    assert [float(v) for v in table["mean_intensity"]] == [30.0, 70.0, 90.0]
    assert "cells_measurements.csv" in widget.status.text()


def test_an_uncalibrated_layer_is_measured_in_pixels(make_napari_viewer, qtbot):
    from qtpy.QtCore import Qt

    from napari_unet._widgets._measure import MeasureWidget

    viewer = make_napari_viewer()
    labels = np.zeros((30, 40), dtype=np.uint16)
    labels[2:12, 5:10] = 3
    layer = viewer.add_labels(labels, name="plain labels")  # scale 1, napari's unit "pixel"
    widget = MeasureWidget(viewer)
    qtbot.addWidget(widget)
    qtbot.waitUntil(lambda: "label" in layer.features, timeout=30_000)
    wait_idle(qtbot, widget)
    headers = [widget.model.headerData(c, Qt.Horizontal) for c in range(widget.model.columnCount())]
    assert "area [px^2]" in headers and "px^2" in widget.status.text()
