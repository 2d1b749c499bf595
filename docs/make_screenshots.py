"""Screenshots of each dock in use, for the README (run under a display, e.g. Xvfb)::

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_screenshots.py

Opens the window as ``napari-unet gui`` does (the docks tabbed, the canvas the largest part) at
1400 x 900 and writes docs/screenshots/{segment,measure,edit,finetune,export}.png (each
< 300 KB). Uses the shipped models (the model Segment picks for each sample).
"""

from __future__ import annotations

import os
import tempfile
import time
from importlib import resources
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np

OUT = Path(__file__).resolve().parent / "screenshots"
MAX_BYTES = 300_000
#: the window's size (the docks keep their share of it, see napari_unet/_widgets/_launch.py)
WINDOW = (1400, 900)
#: the Measurements dock's width in its screenshot (dragged wider, as a user would, to see more
#: columns of the table)
MEASURE_DOCK_WIDTH = 560
#: seconds of fine-tuning shown (a few points of the loss curve)
FINETUNE_SECONDS = 20


def wait(app, condition, timeout: float) -> bool:
    """Run the event loop until ``condition()`` or ``timeout`` seconds; the condition's value."""
    end = time.perf_counter() + timeout
    while not condition() and time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.01)
    return condition()


def write_png(viewer, path: Path) -> Path:
    """The whole window as a 128-colour PNG at ``path``, scaled down until < MAX_BYTES."""
    from PIL import Image

    image = Image.fromarray(viewer.screenshot(canvas_only=False, flash=False)[..., :3])
    scale = 1.0
    while True:
        size = (int(image.width * scale), int(image.height * scale))
        image.resize(size, Image.LANCZOS).quantize(colors=128).save(path, optimize=True)
        if path.stat().st_size < MAX_BYTES or scale < 0.4:
            break
        scale *= 0.85
    print(f"{path} {image.width}x{image.height} {path.stat().st_size // 1000} KB")
    return path


def save(viewer, app, name: str) -> Path:
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()  # napari's start-up warnings (e.g. PyQt5 deprecated) hide the canvas
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    return write_png(viewer, OUT / f"{name}.png")


def private_folders() -> None:
    """This run's journals and settings go to a temporary folder, not the user's: no restore
    question (a modal dialog that would stop the script) about an earlier run's labels, and
    nothing of this run left for the user's next session."""
    scratch = tempfile.mkdtemp(prefix="napari-unet-screenshot-")
    os.environ["NAPARI_UNET_CACHE_DIR"] = os.path.join(scratch, "cache")
    os.environ["NAPARI_UNET_CONFIG_DIR"] = os.path.join(scratch, "config")


def show(dock) -> None:
    """Bring a tabbed dock to the front."""
    dock.parent().raise_()


def main() -> None:
    private_folders()
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QApplication

    from napari_unet._widgets._launch import PLUGIN, fit_docks, launch
    from napari_unet._widgets._state import get_registry, set_corrected_slices
    from napari_unet.io.readers import read_image

    OUT.mkdir(parents=True, exist_ok=True)
    samples = Path(str(resources.files("napari_unet.sample_data")))
    viewer = launch(None, sample="nuclei_2d", show=False)
    window = viewer.window._qt_window
    window.resize(*WINDOW)
    window.show()
    app = QApplication.instance()
    docks = viewer.window.dock_widgets
    segment, edit = docks[f"Segment ({PLUGIN})"], docks[f"Edit ({PLUGIN})"]
    finetune, export = docks[f"Fine-tune ({PLUGIN})"], docks[f"Export ({PLUGIN})"]
    measure = docks[f"Measurements ({PLUGIN})"]
    wait(app, lambda: False, 0.5)
    fit_docks(viewer, [d.parent() for d in (segment, edit, finetune, export, measure)])

    # Segment: the 2D nuclei sample with the model the dock picked
    segment.output_combo.setCurrentText("instances")
    segment.segment()
    wait(app, lambda: segment.worker is None, 300)
    show(segment)
    save(viewer, app, "segment")

    # Measurements: the table of the result, sorted by area, one object selected
    layer = viewer.layers["nuclei_2d labels"]
    wait(app, lambda: measure.worker is None and "label" in layer.features, 120)
    column = measure.model.columns.index("area")
    measure.view.sortByColumn(column, Qt.DescendingOrder)  # the largest objects first
    show(measure)
    window.resizeDocks([measure.parent()], [MEASURE_DOCK_WIDTH], Qt.Horizontal)  # more columns
    viewer.camera.zoom *= 2
    measure.view.selectRow(0)
    measure.go_to_row(0)
    save(viewer, app, "measure")
    fit_docks(viewer, [d.parent() for d in (segment, edit, finetune, export, measure)])

    # Edit: a stack with ground-truth labels, a few corrected slices, seeds for a split
    viewer.layers.clear()
    stack = read_image(samples / "nuclei_3d.tif")
    labels = read_image(samples / "nuclei_3d_labels.tif").data
    scale = stack.voxel_size or (1.0,) * stack.data.ndim
    viewer.add_image(stack.data, name="nuclei_3d", scale=scale)
    layer = viewer.add_labels(labels, name="nuclei_3d labels", scale=scale)
    viewer.reset_view()
    middle = labels.shape[0] // 2
    set_corrected_slices(layer, [middle - 10, middle, middle + 10])
    viewer.dims.set_point(0, middle * scale[0])
    edit.labels_combo.set_layer(layer)
    points = edit.add_seeds_layer()
    ids = np.unique(labels[middle])[1:]
    if ids.size:
        ys, xs = np.nonzero(labels[middle] == ids[len(ids) // 2])
        points.add([[middle, ys.min() + 2, xs.mean()], [middle, ys.max() - 2, xs.mean()]])
    viewer.layers.selection.active = layer
    show(edit)
    save(viewer, app, "edit")

    # Fine-tune: the 3D nuclei model, a few seconds on the corrected slices, with the live loss
    # curve and preview
    get_registry().current = "nuclei-3d"
    finetune.image_combo.setCurrentText("nuclei_3d")
    finetune.labels_combo.setCurrentText("nuclei_3d labels")
    finetune.time_spin.setValue(FINETUNE_SECONDS)
    finetune.validation_check.setChecked(True)
    show(finetune)
    finetune.fine_tune()
    wait(app, lambda: finetune.worker is None, 300)
    save(viewer, app, "finetune")

    # Export: the labels written as a calibrated TIFF with the measurements next to it
    with TemporaryDirectory() as folder:
        export.labels_combo.set_layer(layer)
        export.measure_check.setChecked(True)
        export.path_edit.setText(str(Path(folder) / "nuclei_3d_labels.tif"))
        show(export)
        export.export()
        wait(app, lambda: export.worker is None, 120)
        save(viewer, app, "export")
    viewer.close()


if __name__ == "__main__":
    main()
