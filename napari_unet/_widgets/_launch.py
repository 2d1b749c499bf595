"""Open napari with the four docks and an image (``napari-unet gui``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLUGIN = "napari-unet"
DOCKS = ("Segment", "Edit", "Fine-tune", "Export")
DEFAULT_SAMPLE = "nuclei_3d"


def launch(path: str | Path | None = None, *, viewer: Any = None, sample: str = DEFAULT_SAMPLE,
           show: bool = True) -> Any:
    """A viewer with the Segment, Edit, Fine-tune and Export docks and ``path`` (or a sample) open.

    Raises
    ------
    napari_unet.io.ImageReadError
        ``path`` cannot be opened.
    """
    import napari

    from ._io import read_layers
    from ._state import get_registry

    layers = read_layers(str(path)) if path is not None else None  # errors before any window
    if viewer is None:
        viewer = napari.Viewer(title="napari-unet", show=show)
    get_registry().refresh_shipped()
    docks = []
    for name in DOCKS:
        dock, _widget = viewer.window.add_plugin_dock_widget(PLUGIN, name, tabify=name != DOCKS[0])
        docks.append(dock)
    if docks:
        docks[0].raise_()
    if layers is not None:
        for data, kwargs, kind in layers:
            getattr(viewer, f"add_{kind}")(data, **kwargs)
    else:
        viewer.open_sample(PLUGIN, sample)
    return viewer


def run_gui(path: str | Path | None = None, sample: str = DEFAULT_SAMPLE) -> None:
    """``napari-unet gui``: open the viewer and run napari's event loop until it is closed."""
    import napari

    launch(path, sample=sample)
    napari.run()
