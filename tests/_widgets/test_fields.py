"""The docks' form fields: the layer choosers and napari's reset_choices."""

from __future__ import annotations

import functools

import pytest


def test_layer_combo_keeps_its_layer_and_picks_the_active_or_newest(make_napari_viewer):
    import numpy as np
    from napari.layers import Image

    from napari_unet._widgets._fields import LayerCombo

    viewer = make_napari_viewer()
    a = viewer.add_image(np.zeros((8, 8)), name="a")
    b = viewer.add_image(np.zeros((8, 8)), name="b")
    viewer.add_labels(np.zeros((8, 8), dtype=np.uint8), name="not an image")
    combo = LayerCombo(viewer, (Image,), "images")
    seen = []
    combo.changed.connect(seen.append)
    assert [combo.itemText(i) for i in range(combo.count())] == ["a", "b"]  # images only
    assert combo.layer() is b  # the newest (the labels layer is the active one)
    combo.setCurrentText("a")  # as a user's pick (Qt's API reaches the combo box)
    assert combo.layer() is a and seen == [a]
    c = viewer.add_image(np.zeros((8, 8)), name="c")
    assert combo.layer() is a  # a new layer does not take the choice
    a.name = "renamed"
    assert combo.layer() is a and combo.currentText() == "renamed"
    viewer.layers.move(0, 3)  # order changes keep it too
    assert combo.layer() is a
    viewer.layers.selection.active = b
    viewer.layers.remove(a)  # gone: the active image is chosen, and the dock told
    assert combo.layer() is b and seen[-1] is b
    viewer.layers.selection.active = viewer.layers["not an image"]
    viewer.layers.remove(b)
    assert combo.layer() is c  # else the newest
    viewer.layers.remove(c)  # none left: the dock is told too (value None)
    assert combo.layer() is None and combo.count() == 0 and seen[-1] is None
    combo.set_layer(viewer.add_image(np.zeros((8, 8)), name="d"))
    assert combo.currentText() == "d"


def test_layer_combo_with_none_keeps_none(make_napari_viewer):
    import numpy as np
    from napari.layers import Points

    from napari_unet._widgets._fields import LayerCombo

    viewer = make_napari_viewer()
    combo = LayerCombo(viewer, (Points,), "seeds", allow_none=True)
    assert combo.currentText() == "(none)" and combo.layer() is None
    viewer.add_points(np.zeros((1, 2)), name="seeds")
    assert combo.layer() is None  # "(none)" stays chosen
    combo.setCurrentText("seeds")
    assert combo.layer() is viewer.layers["seeds"]
    viewer.layers.remove("seeds")
    assert combo.currentText() == "(none)"


def test_napari_refreshes_a_docked_docks_choosers_and_not_a_closed_one(make_napari_viewer,
                                                                        monkeypatch):
    import numpy as np
    from qtpy.QtCore import QEvent
    from qtpy.QtWidgets import QApplication

    from napari_unet._widgets._export import ExportWidget
    from napari_unet._widgets._fields import LayerChoices, LayerCombo

    calls = []
    for cls in (LayerChoices, LayerCombo):
        @functools.wraps(cls.reset_choices)
        def spy(self, *args, original=cls.reset_choices):
            calls.append(type(self).__name__)
            original(self, *args)
        monkeypatch.setattr(cls, "reset_choices", spy)
    viewer = make_napari_viewer()
    dock = ExportWidget(viewer)
    calls.clear()
    viewer.add_labels(np.zeros((8, 8), dtype=np.uint8), name="cells")
    # not docked: napari does not call the dock; the chooser follows the layer list itself
    assert calls == ["LayerCombo"] and dock.labels_combo.currentText() == "cells"
    viewer.window.add_dock_widget(dock, name="Export")
    calls.clear()
    viewer.add_labels(np.zeros((8, 8), dtype=np.uint8), name="more")
    # docked: napari calls the dock's reset_choices, which reaches its chooser
    assert sorted(calls) == ["ExportWidget", "LayerCombo", "LayerCombo"]
    assert dock.labels_combo.currentText() == "cells"
    viewer.window.remove_dock_widget(dock)
    dock.deleteLater()
    QApplication.sendPostedEvents(None, QEvent.DeferredDelete)
    with pytest.raises(RuntimeError):
        dock.objectName()  # the Qt object is gone; napari still calls its reset_choices
    viewer.add_labels(np.zeros((8, 8), dtype=np.uint8), name="after")  # and nothing fails
    assert "ExportWidget" in calls[3:]
