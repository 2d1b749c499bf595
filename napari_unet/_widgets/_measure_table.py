"""The Measurements dock's table: a Qt model over a measurement table (column -> array)."""

from __future__ import annotations

from typing import Any

import numpy as np
from qtpy.QtCore import QAbstractTableModel, QModelIndex, Qt

from napari_unet.io.table import header
from napari_unet.labels.measure import sort_rows


class MeasurementModel(QAbstractTableModel):
    """Rows = objects, columns = measurements; sortable by any column (NaN last)."""

    def __init__(self, parent: Any = None):
        super().__init__(parent)
        self.table: dict[str, np.ndarray] = {}
        self.units: dict[str, str] = {}
        self.columns: list[str] = []
        #: the table's row shown at each view row (the sort order)
        self.order = np.zeros(0, dtype=np.int64)
        self._sort: tuple[int, Any] | None = None

    def set_table(self, table: dict[str, np.ndarray], units: dict[str, str]) -> None:
        """Show ``table``, keeping the current sort column and direction."""
        self.beginResetModel()
        self.table = {name: np.asarray(values) for name, values in table.items()}
        self.units = dict(units)
        self.columns = [name for name in self.table if name != "index"]
        self.order = np.arange(len(self.table.get("label", ())), dtype=np.int64)
        self.endResetModel()
        if self._sort is not None and self._sort[0] < len(self.columns):
            self.sort(*self._sort)

    def rowCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: N802 - Qt API
        return 0 if parent.isValid() else len(self.order)

    def columnCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: N802 - Qt API
        return 0 if parent.isValid() else len(self.columns)

    def value(self, row: int, column: str) -> Any:
        """The value of ``column`` at view row ``row``."""
        return self.table[column][self.order[row]]

    def label_at(self, row: int) -> int:
        return int(self.value(row, "label"))

    def row_of_label(self, label: int) -> int | None:
        hits = np.flatnonzero(self.table["label"][self.order] == label) if self.columns else []
        return int(hits[0]) if len(hits) else None

    def data(self, index: QModelIndex, role: int = Qt.DisplayRole) -> Any:
        if not index.isValid():
            return None
        if role in (Qt.DisplayRole, Qt.ToolTipRole):
            value = self.value(index.row(), self.columns[index.column()])
            if isinstance(value, (float, np.floating)):
                return "" if np.isnan(value) else f"{float(value):.4g}"
            return str(int(value)) if isinstance(value, (int, np.integer)) else str(value)
        return None

    def headerData(self, section: int, orientation: Any, role: int = Qt.DisplayRole) -> Any:  # noqa: N802
        if role != Qt.DisplayRole:
            return None
        if orientation == Qt.Horizontal and section < len(self.columns):
            name = self.columns[section]
            return header(name, self.units.get(name, ""))
        if orientation == Qt.Vertical:
            return str(section + 1)
        return None

    def sort(self, column: int, order: Any = Qt.AscendingOrder) -> None:
        if not 0 <= column < len(self.columns):
            return
        self._sort = (column, order)
        self.layoutAboutToBeChanged.emit()
        self.order = sort_rows(self.table, self.columns[column],
                               descending=order == Qt.DescendingOrder)
        self.layoutChanged.emit()
