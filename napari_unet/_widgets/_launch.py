"""Open napari with the docks and an image (``napari-unet gui``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: the plugin's name for napari: the distribution's name (napari.yaml `name`), not the import name
PLUGIN = "napari-unet-loop"
DOCKS = ("Segment", "Edit", "Fine-tune", "Export", "Measurements")
DEFAULT_SAMPLE = "nuclei_3d"


def launch(path: str | Path | None = None, *, viewer: Any = None, sample: str = DEFAULT_SAMPLE,
           show: bool = True) -> Any:
    """A viewer with the Segment, Edit, Fine-tune, Export and Measurements docks and ``path`` (or a sample) open.

    Raises
    ------
    napari_unet.io.ImageReadError
        ``path`` cannot be opened.
    """
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_unet._widgets._io import read_layers
    from napari_unet.zoo.registry import get_registry

    layers = read_layers(str(path)) if path is not None else None  # errors before any window
    if viewer is None:
        viewer = napari.Viewer(title="napari-unet", show=show)
    get_registry().refresh_shipped()
    docks = []
    for name in DOCKS:
        dock, _widget = viewer.window.add_plugin_dock_widget(PLUGIN, name, tabify=name != DOCKS[0])
        dock.setWindowTitle(name)  # the tab reads "Segment", not "Segment (napari-unet-loop)"
        docks.append(dock)
    before = len(viewer.layers)
    if layers is not None:
        for data, kwargs, kind in layers:
            getattr(viewer, f"add_{kind}")(data, **kwargs)
    else:
        viewer.open_sample(PLUGIN, sample)
    for layer in list(viewer.layers)[before:]:
        set_contrast(layer)
    narrow_forms(docks)
    if show:
        viewer.window._qt_window.showMaximized()
    if docks:
        QApplication.processEvents()  # the docks are tabified on the next pass of the event loop
        docks[0].raise_()
        fit_docks(viewer, docks)
    return viewer


#: the most of the window's width the plugin's tabbed docks and napari's layer docks take
#: (more where their contents need it): in a 1100 px window the canvas keeps more than half
DOCK_FRACTIONS = {"plugin": 0.21, "layers": 0.2}
#: napari's layer list and layer controls shrink to this width (their buttons and sliders fit)
LAYER_DOCKS_MIN_WIDTH = 225
#: margins inside the plugin's docks (Qt's default is 9-11 px)
MARGIN = 4


def narrow_forms(docks: list[Any]) -> None:
    """Make the docks narrow: a form puts a field under its label when it is narrow (Qt's
    ``WrapLongRows``) and margins are small (:func:`fit_docks` then lets each dock be as narrow
    as its contents allow)."""
    from qtpy.QtWidgets import QFormLayout, QGroupBox

    for dock in docks:
        widget = dock.widget()
        if widget is None:
            continue
        for form in widget.findChildren(QFormLayout):
            form.setRowWrapPolicy(QFormLayout.WrapLongRows)
        for holder in [widget, *widget.findChildren(QGroupBox)]:
            if holder.layout() is not None:
                holder.layout().setContentsMargins(MARGIN, MARGIN, MARGIN, MARGIN)
        widget.updateGeometry()


def fit_docks(viewer: Any, plugin_docks: list[Any]) -> None:
    """Give the tabbed docks and napari's layer list/controls :data:`DOCK_FRACTIONS` of the
    window's width (or what their contents need, if more), the canvas the rest."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QApplication, QFormLayout

    window = viewer.window._qt_window
    qt_viewer = viewer.window._qt_viewer
    docks, fractions = [plugin_docks[0]], [DOCK_FRACTIONS["plugin"]]
    for name in ("dockLayerList", "dockLayerControls"):
        dock = getattr(qt_viewer, name, None)
        if dock is not None and dock.isVisible():
            for form in dock.findChildren(QFormLayout):
                form.setRowWrapPolicy(QFormLayout.WrapLongRows)
            dock.setMinimumWidth(LAYER_DOCKS_MIN_WIDTH)
            docks.append(dock)
            fractions.append(DOCK_FRACTIONS["layers"])
    QApplication.processEvents()  # the wrapped forms' minimum widths take effect
    for dock in plugin_docks:  # the dock's layout keeps the minimum of the form before wrapping
        if dock.widget() is not None:
            dock.setMinimumWidth(dock.widget().minimumSizeHint().width())
    window.resizeDocks(docks, [int(f * window.width()) for f in fractions], Qt.Horizontal)


#: percentiles of an image layer's intensities shown as black and white when it opens
CONTRAST_PERCENTILES = (1.0, 99.8)


def set_contrast(layer: Any, percentiles: tuple[float, float] = CONTRAST_PERCENTILES,
                 max_voxels: int = 2_000_000) -> None:
    """Set an image layer's contrast limits to ``percentiles`` of (a regular subsample of) its
    data, so a dim stack is not shown nearly black; other layers are left alone."""
    import numpy as np
    from napari.layers import Image

    if not isinstance(layer, Image) or layer.rgb:
        return
    data = layer.data[-1] if layer.multiscale else layer.data  # the smallest level
    step = max(1, int(np.ceil((int(np.prod(data.shape)) / max_voxels) ** (1 / data.ndim))))
    sample = np.asarray(data[(slice(None, None, step),) * data.ndim], dtype=np.float64)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return
    low, high = (float(v) for v in np.percentile(sample, percentiles))
    if high > low:
        layer.contrast_limits = (low, high)


def run_gui(path: str | Path | None = None, sample: str = DEFAULT_SAMPLE) -> None:
    """``napari-unet gui``: open the viewer and run napari's event loop until it is closed."""
    import napari

    launch(path, sample=sample)
    napari.run()
