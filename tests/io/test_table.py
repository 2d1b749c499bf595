"""Measurement CSVs: units in the header, NaN as empty cells, the name next to a labels file."""

from pathlib import Path

import numpy as np
import pytest

from napari_unet.io.table import measurements_path, read_csv, write_csv


def test_csv_has_units_in_the_header_and_the_values(tmp_path):
    table = {"label": np.array([3, 8]), "volume": np.array([1.5, np.nan]),
             "solidity": np.array([0.25, 1.0])}
    path = write_csv(tmp_path / "m.csv", table, {"volume": "um^3"})
    text = path.read_text().splitlines()
    assert text == ["label,volume [um^3],solidity", "3,1.5,0.25", "8,,1"]
    assert read_csv(path)["volume [um^3]"] == ["1.5", ""]


def test_csv_refuses_ragged_columns(tmp_path):
    with pytest.raises(ValueError, match="lengths"):
        write_csv(tmp_path / "m.csv", {"a": [1, 2], "b": [1]})
    assert not (tmp_path / "m.csv").exists()


@pytest.mark.parametrize("name, expected", [("cells.tif", "cells_measurements.csv"),
                                            ("a.ome.tiff", "a_measurements.csv"),
                                            ("x.ome.zarr", "x_measurements.csv")])
def test_measurements_path_sits_next_to_the_labels(name, expected):
    assert measurements_path(Path("/d") / name) == Path("/d") / expected
