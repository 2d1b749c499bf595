"""The README's Live mode screenshot, from a real napari window (run under a display, e.g.
Xvfb)::

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_live_screenshot.py

An empty start (default): the 2D nuclei sample, a new untrained model, a few nuclei and some
background painted (with napari's own paint calls, from the sample's labels); Live trains for
``--seconds`` and the live prediction layer shows what the model makes of the whole image.
``--finetune``: the shipped nuclei-2d model, its segmentation corrected in a few places.
Writes docs/live.png (< 300 KB).
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

import numpy as np
from make_screenshots import private_folders, wait, write_png  # docs/ is on sys.path when run as a script

OUT = Path(__file__).resolve().parent / "live.png"
#: the label id the simulated user paints background with (empty start)
BACKGROUND = 200


def save(viewer, app, path: Path) -> Path:
    wait(app, lambda: False, 0.5)
    return write_png(viewer, path)


def paint_objects(layer, truth: np.ndarray, ids: list[int]) -> None:
    """Paint the objects ``ids`` of ``truth`` into the layer, as napari's brush would."""
    for i in ids:
        where = np.nonzero(truth == i)
        layer.data_setitem(where, int(i))


def paint_background(layer, truth: np.ndarray, boxes: list[tuple[slice, slice]]) -> None:
    """Paint the background pixels of ``boxes`` with the background label."""
    for box in boxes:
        mask = np.zeros(truth.shape, bool)
        mask[box] = truth[box] == 0
        layer.data_setitem(np.nonzero(mask), BACKGROUND)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finetune", action="store_true",
                        help="start from the shipped nuclei-2d model instead of a new one")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds of live training")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    private_folders()

    import tifffile
    from qtpy.QtWidgets import QApplication

    from napari_unet._widgets._launch import PLUGIN, launch
    from napari_unet._widgets._new_model import NewModelSpec
    from napari_unet._widgets._state import get_registry

    import napari._qt.qt_main_window as main_window

    main_window.SHOW_QT_WARNING = False  # no PyQt5 deprecation toast in the picture
    samples = Path(str(resources.files("napari_unet.sample_data")))
    truth = tifffile.imread(samples / "nuclei_2d_labels.tif")
    viewer = launch(None, sample="nuclei_2d")
    viewer.window._qt_window.resize(1500, 900)
    app = QApplication.instance()
    finetune = viewer.window.dock_widgets[f"Fine-tune ({PLUGIN})"]
    image = viewer.layers["nuclei_2d"]
    registry = get_registry()
    layer = viewer.add_labels(np.zeros(truth.shape, np.uint16), name="nuclei_2d labels")
    finetune.image_combo.set_layer(image)
    finetune.labels_combo.set_layer(layer)
    ids = [int(i) for i in np.unique(truth[60:300, 80:420]) if i][:8]
    if args.finetune:
        from napari_unet.engine.predict import segment
        from napari_unet.progress import drain

        registry.current = "nuclei-2d"
        result = drain(segment(np.asarray(image.data), registry.get(), output="instances"))
        layer.data = np.asarray(result.data, dtype=np.uint16)
        finetune.live.start()
        paint_objects(layer, truth, ids)
    else:
        finetune.create_model(NewModelSpec(spatial_dims=2, task="foreground_boundary",
                                           name="my-nuclei"))
        finetune.live.background_spin.setValue(BACKGROUND)
        finetune.live.start()
        paint_objects(layer, truth, ids)
        paint_background(layer, truth, [(slice(60, 300), slice(80, 420))])
    layer.opacity = 0.35
    viewer.layers.selection.active = layer
    finetune.parent().raise_()
    wait(app, lambda: False, 1.0)
    viewer.reset_view()
    viewer.camera.zoom *= 1.25
    wait(app, lambda: False, args.seconds)
    live = finetune.live
    print(live.score_label.text(), "|", live.clock_label.text())
    save(viewer, app, args.out)
    live.stop()
    wait(app, lambda: live.worker is None, 60)
    viewer.close()


if __name__ == "__main__":
    main()
