"""Screenshots of each dock in use, for the README (run under a display, e.g. Xvfb)::

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_screenshots.py

Writes docs/screenshots/{segment,edit,finetune,export}.png (each < 300 KB). Uses the shipped
models when installed, else a small untrained network (the docks look the same).
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "screenshots"
MAX_BYTES = 300_000


def wait(app, condition, timeout: float) -> None:
    end = time.perf_counter() + timeout
    while not condition() and time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.01)


def save(viewer, app, name: str) -> Path:
    from PIL import Image

    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    path = OUT / f"{name}.png"
    array = viewer.screenshot(canvas_only=False, flash=False)
    image = Image.fromarray(array[..., :3])
    scale = 1.0
    while True:
        size = (int(image.width * scale), int(image.height * scale))
        image.resize(size, Image.LANCZOS).quantize(colors=128).save(path, optimize=True)
        if path.stat().st_size < MAX_BYTES or scale < 0.4:
            break
        scale *= 0.85
    print(f"{path} {path.stat().st_size // 1000} KB")
    return path


def main() -> None:
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_unet.checkpoint import SegmentationModel, list_pretrained, load_model
    from napari_unet.io import read_image
    from napari_unet.models import UNet, UNetConfig
    from napari_unet._widgets._launch import PLUGIN, launch
    from napari_unet._widgets._state import get_registry

    OUT.mkdir(parents=True, exist_ok=True)
    samples = Path(str(resources.files("napari_unet.sample_data")))
    viewer = launch(None, sample="nuclei_2d")
    viewer.window._qt_window.resize(1500, 900)
    app = QApplication.instance()
    docks = viewer.window.dock_widgets
    registry = get_registry()
    if "nuclei-2d" in list_pretrained():
        registry.current = "nuclei-2d"
    else:
        network = UNet(UNetConfig(spatial_dims=2, out_channels=2, base_channels=8, depth=3)).eval()
        registry.add_model(SegmentationModel(network, task="foreground_boundary", name="demo"))
    load_model  # noqa: B018 - imported for readers of this script

    # Segment: mid-run on the 2D nuclei image
    segment = docks[f"Segment ({PLUGIN})"]
    segment.output_combo.setCurrentText("instances")
    segment.segment()
    wait(app, lambda: segment.worker is None, 300)
    docks[f"Segment ({PLUGIN})"].parent().raise_()
    save(viewer, app, "segment")

    # Edit: a stack with ground-truth labels, a few corrected slices, seeds for a split
    viewer.layers.clear()
    stack = read_image(samples / "nuclei_3d.tif")
    labels = read_image(samples / "nuclei_3d_labels.tif").data
    viewer.add_image(stack.data, name="nuclei_3d", scale=stack.voxel_size)
    layer = viewer.add_labels(labels, name="nuclei_3d labels", scale=stack.voxel_size)
    layer.metadata["napari_unet_corrected_slices"] = [20, 45, 60]
    viewer.dims.set_point(0, 45 * stack.voxel_size[0])
    edit = docks[f"Edit ({PLUGIN})"]
    edit.labels_combo.set_layer(layer)
    edit._fill_slices()
    points = edit.add_seeds_layer()
    ids = np.unique(labels[45])[1:]
    if ids.size:
        ys, xs = np.nonzero(labels[45] == ids[len(ids) // 2])
        points.add([[45, ys.min() + 2, xs.mean()], [45, ys.max() - 2, xs.mean()]])
    viewer.layers.selection.active = layer
    edit.parent().raise_()
    save(viewer, app, "edit")

    # Fine-tune: a few seconds on the corrected slices, with the live loss curve and preview
    finetune = docks[f"Fine-tune ({PLUGIN})"]
    if "nuclei-3d" in list_pretrained():
        registry.current = "nuclei-3d"
    else:
        network = UNet(UNetConfig(spatial_dims=3, out_channels=2, base_channels=4, depth=2)).eval()
        registry.add_model(SegmentationModel(network, task="foreground_boundary", name="demo-3d"))
    finetune.image_combo.setCurrentText("nuclei_3d")
    finetune.labels_combo.setCurrentText("nuclei_3d labels")
    finetune.time_spin.setValue(25)
    finetune.validation_check.setChecked(True)
    finetune.parent().raise_()
    finetune.fine_tune()
    wait(app, lambda: finetune.worker is None, 300)
    save(viewer, app, "finetune")

    # Export: the labels written as a calibrated TIFF
    export = docks[f"Export ({PLUGIN})"]
    export.labels_combo.set_layer(layer)
    export.path_edit.setText(str(Path("/tmp") / "nuclei_3d_labels_export.tif"))
    export.parent().raise_()
    export.export()
    wait(app, lambda: export.worker is None, 120)
    save(viewer, app, "export")
    viewer.close()


if __name__ == "__main__":
    main()
