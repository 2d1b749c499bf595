"""Measurement tables as CSV: written atomically, units in the header, next to a labels file."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from napari_unet.io.files import atomic_write

#: what the table written next to ``labels.tif`` is called: ``labels`` + this
MEASUREMENTS_SUFFIX = "_measurements.csv"


def measurements_path(labels_path: str | Path) -> Path:
    """The CSV written next to the labels file: ``<name>_measurements.csv``."""
    path = Path(labels_path)
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".zarr"):
        if name.lower().endswith(suffix):
            return path.with_name(name[: -len(suffix)] + MEASUREMENTS_SUFFIX)
    return path.with_name(name + MEASUREMENTS_SUFFIX)


def header(name: str, unit: str) -> str:
    """A column's CSV header: ``volume [um^3]``, or the bare name for unitless columns."""
    return f"{name} [{unit}]" if unit else name


def _cell(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return "" if np.isnan(value) else f"{float(value):.6g}"
    return str(value.item() if isinstance(value, np.generic) else value)


def write_csv(path: str | Path, table: Mapping[str, Any],
              units: Mapping[str, str] | None = None) -> Path:
    """Write ``table`` (column -> values, equal lengths) as CSV at ``path``, atomically.

    ``units`` maps columns to their unit, shown in the header (``area [um^2]``); NaN is written
    as an empty cell. Returns the path.
    """
    units = units or {}
    columns = list(table)
    values = [np.asarray(table[c]) for c in columns]
    lengths = {len(v) for v in values}
    if len(lengths) > 1:
        raise ValueError(f"the table's columns have different lengths: {sorted(lengths)}")

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow([header(c, units.get(c, "")) for c in columns])
            for i in range(lengths.pop() if lengths else 0):
                writer.writerow([_cell(v[i]) for v in values])

    return atomic_write(path, write)


def read_csv(path: str | Path) -> dict[str, list[str]]:
    """A CSV written by :func:`write_csv` as header -> cells (strings), for checks and tests."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return {}
    return {name: [r[i] for r in rows[1:]] for i, name in enumerate(rows[0])}


def export_measurements(labels_path: str | Path, labels: np.ndarray, *,
                        voxel_size: tuple[float, ...] | None, unit: str,
                        image: np.ndarray | None = None) -> Path:
    """Measure ``labels`` (as written to ``labels_path``) and write the table next to it
    (:func:`measurements_path`); returns the CSV's path."""
    from napari_unet.labels.measure import column_units, measure

    table = measure(labels, image, voxel_size)
    return write_csv(measurements_path(labels_path), table,
                     column_units(np.ndim(labels), unit, intensity=image is not None))
