"""napari plugin: docks (Segment, Edit, Fine-tune, Export, Measurements), reader, writer and sample data.

The only place in the package that imports napari, qtpy or magicgui. Importing this package is
cheap: the docks are imported when napari opens them.
"""

from __future__ import annotations

__all__ = ["SegmentWidget", "EditWidget", "FineTuneWidget", "ExportWidget", "MeasureWidget"]


def __getattr__(name: str):
    if name == "SegmentWidget":
        from napari_unet._widgets._segment import SegmentWidget

        return SegmentWidget
    if name == "EditWidget":
        from napari_unet._widgets._edit import EditWidget

        return EditWidget
    if name == "FineTuneWidget":
        from napari_unet._widgets._finetune import FineTuneWidget

        return FineTuneWidget
    if name == "ExportWidget":
        from napari_unet._widgets._export import ExportWidget

        return ExportWidget
    if name == "MeasureWidget":
        from napari_unet._widgets._measure import MeasureWidget

        return MeasureWidget
    raise AttributeError(name)
