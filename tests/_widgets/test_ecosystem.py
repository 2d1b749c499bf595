"""First look of ``napari-unet gui``, settings kept between sessions, Zoo packages in the docks."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from .conftest import blobs, click, make_tiny_model, wait_idle

SAMPLES = Path(str(resources.files("napari_unet.sample_data")))


def _tab_bars(viewer):
    from qtpy.QtWidgets import QTabBar

    return [[bar.tabText(i) for i in range(bar.count())] + [bar.currentIndex()]
            for bar in viewer.window._qt_window.findChildren(QTabBar) if bar.count()]


def test_gui_first_look(make_napari_viewer, registry):
    from napari_unet._widgets._launch import launch

    viewer = launch(None, viewer=make_napari_viewer(show=True), sample="nuclei_3d", show=True)
    bars = [b for b in _tab_bars(viewer) if "Segment" in b]
    assert bars == [["Segment", "Edit", "Fine-tune", "Export", "Measurements", 0]]  # readable, Segment in front
    assert viewer.window._qt_window.isMaximized()
    layer = viewer.layers["nuclei_3d"]
    low, high = np.percentile(layer.data, (1, 99.8))
    assert tuple(layer.contrast_limits) == pytest.approx((low, high))
    assert high < 0.8 * float(layer.data.max())  # the dim sample is brighter than min..max


def test_settings_come_back_in_the_next_session(make_napari_viewer, registry, model_2d_path):
    from napari_unet._widgets._finetune import FineTuneWidget
    from napari_unet._widgets._segment import SegmentWidget
    from napari_unet._widgets._state import ModelRegistry, restore_last_model
    from napari_unet.io.settings import load_settings

    viewer = make_napari_viewer()
    segment, finetune = SegmentWidget(viewer), FineTuneWidget(viewer)
    segment.load_model_file(model_2d_path)
    index = segment.output_combo.findText("binary / classes")
    segment.output_combo.setCurrentIndex(index)
    segment.output_combo.activated.emit(index)  # as a user's pick
    cpu = finetune.device_combo.findData("cpu")
    finetune.device_combo.setCurrentIndex(cpu)
    finetune.device_combo.activated.emit(cpu)
    finetune.time_spin.setValue(95)
    assert load_settings() == {"model_file": str(Path(model_2d_path).resolve()), "device": "cpu",
                               "output": "binary / classes", "time_limit": 95}

    fresh = ModelRegistry()  # the next session's registry
    assert restore_last_model(fresh) == fresh.current and "tiny" in fresh.current
    segment2, finetune2 = SegmentWidget(viewer), FineTuneWidget(viewer)
    assert segment2.device_combo.currentData() == "cpu" == finetune2.device_combo.currentData()
    assert finetune2.time_spin.value() == 95
    segment2._describe(registry.current)  # a model that suggests instances: the pick stays
    assert segment2.output_combo.currentText() == "binary / classes"


def test_zoo_packages_in_segment_and_finetune(make_napari_viewer, qtbot, registry, tmp_path,
                                             notifications):
    pytest.importorskip("bioimageio.spec")
    from napari_unet._widgets._finetune import FineTuneWidget
    from napari_unet._widgets._segment import SegmentWidget
    from napari_unet.zoo.export import export_bioimageio
    from napari_unet.zoo.foreign import ForeignModel

    from ..zoo.test_zoo import foreign_package

    image, labels = blobs((64, 64))
    ours = export_bioimageio(make_tiny_model(2, name="zooed"), tmp_path / "ours.zip",
                             test_image=image, weight_formats=["pytorch_state_dict"]).path
    theirs = foreign_package(tmp_path / "pkg", "onnx")
    viewer = make_napari_viewer()
    viewer.add_image(image, name="img")
    viewer.add_labels(labels, name="img labels")
    segment, finetune = SegmentWidget(viewer), FineTuneWidget(viewer)

    key = finetune.load_model_file(ours)  # ours fine-tunes as usual
    assert key == "zooed v1" and segment.model_combo.currentData() == key
    key = segment.load_model_file(theirs)
    assert isinstance(registry.get(key), ForeignModel)
    segment.output_combo.setCurrentText("binary / classes")
    click(qtbot, segment, "Segment")
    wait_idle(qtbot, segment)
    result = viewer.layers["img labels"].data
    assert result.shape == (64, 64) and result.any()
    finetune.fine_tune()  # refused: not one of our networks
    assert finetune.worker is None
    assert any("cannot" not in m and "fine-tunes its own UNets" in m for _, m in notifications)
    assert finetune.load_model_file(tmp_path / "missing.zip") is None
    assert "not found" in notifications[-1][1]


def test_the_qt_binding_is_the_one_asked_for(qtbot):
    """``.ci/run`` runs these tests twice: PyQt5 (the default), then QT_API=pyqt6."""
    import os

    import qtpy

    wanted = os.environ.get("QT_API", "pyqt5").lower()
    assert qtpy.API_NAME.lower() == wanted
    assert type(qtbot).__module__.startswith("pytestqt")
    from pytestqt.qt_compat import qt_api

    assert qt_api.pytest_qt_api == wanted
