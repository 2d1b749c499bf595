"""Segment's click does only what the user must see at once; the run redraws only what is shown.

No timings: what the click handler and the tile callbacks do on the main thread is observed
(the model is held back, calls are counted).
"""

from __future__ import annotations

import sys
import threading

import numpy as np

from napari_unet._widgets import _segment_run
from napari_unet.engine.live import PredictOptions

from .conftest import blobs, click, wait_idle


def _dock(viewer):
    from napari_unet._widgets._segment import SegmentWidget

    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    return widget


def test_click_returns_with_the_layer_before_the_model_has_run(make_napari_viewer, qtbot,
                                                               registry, model_2d_path,
                                                               monkeypatch):
    import napari.utils
    from napari.utils import progress

    from napari_unet.engine import runner

    release = threading.Event()
    original = runner.TileRunner._run_batch

    def held_back(self, tiles, write):  # the model waits until the test lets it run
        release.wait(60)
        return original(self, tiles, write)

    monkeypatch.setattr(runner.TileRunner, "_run_batch", held_back)
    made = []

    def make_bar(*args, **kwargs):
        made.append(progress(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(napari.utils, "progress", make_bar)
    viewer = make_napari_viewer()
    image, _ = blobs((8, 48, 48))
    viewer.add_image(image, name="stack")
    widget = _dock(viewer)
    widget.load_model_file(model_2d_path)
    widget.output_combo.setCurrentText("binary / classes")
    widget.write_combo.setCurrentText("new labels layer")
    bars_before = len(progress._all_instances)
    try:
        click(qtbot, widget, "Segment")
        # the click is over: the layer is there, empty, and the model has not produced a tile
        layer = viewer.layers["stack labels"]
        assert widget.worker is not None and widget._run.done == 0
        assert layer.data.shape == (8, 48, 48) and not layer.data.any()
        # napari's activity-panel bar (which repaints the whole window when made) is not made
        # by the click, but with the first tiles
        assert not made and len(progress._all_instances) == bars_before
    finally:
        release.set()  # the tiles come at once: callbacks run inside the bar's processEvents
    wait_idle(qtbot, widget)
    # one bar, made with the tiles, and closed at the end
    assert len(made) == 1 and made[0].total >= 1
    assert widget._pbar is None and len(progress._all_instances) == bars_before
    assert "Done" in widget.status.text()


def test_tiles_off_screen_do_not_redraw_the_layer(make_napari_viewer, qtbot, registry,
                                                   model_2d_path, monkeypatch):
    from napari.layers import Labels

    monkeypatch.setattr(_segment_run, "REFRESH_INTERVAL", 0.0)  # every tile may redraw
    by_tile = []
    original = Labels.refresh

    def counted(self, *args, **kwargs):
        if sys._getframe(1).f_code.co_name == "_tile_written":
            by_tile.append(int(np.count_nonzero(self.data.any(axis=(1, 2)))))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Labels, "refresh", counted)
    viewer = make_napari_viewer()
    image, _ = blobs((6, 48, 48))
    viewer.add_image(image, name="stack")
    viewer.dims.set_point(0, 4)
    widget = _dock(viewer)
    widget.load_model_file(model_2d_path)
    widget.output_combo.setCurrentText("binary / classes")
    widget.write_combo.setCurrentText("new labels layer")
    widget.predict_options = PredictOptions(batch_size=1)  # one tile per slice
    widget.threshold_spin.setValue(0.01)  # the untrained model: foreground everywhere
    widget.min_size_spin.setValue(0)
    click(qtbot, widget, "Segment")
    wait_idle(qtbot, widget)
    layer = viewer.layers["stack labels"]
    assert layer.data[4].any() and widget._run.total >= 6
    # the slice on screen was redrawn when its tile came; the 5 others changed nothing shown
    assert len(by_tile) == 1, by_tile
    assert widget.first_tile_seconds is not None
