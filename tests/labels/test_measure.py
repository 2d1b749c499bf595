"""Per-object measurements: calibrated volumes with anisotropic voxels, 2D shape columns, and
the incremental update after an edit."""

import numpy as np
import pytest

from napari_unet.labels.measure import (
    column_units,
    measure,
    measure_labels,
    sort_rows,
    touched_labels,
    update_table,
)
from napari_unet.progress import drain


def ellipsoid(shape, centre, semi_axes, spacing):
    """A boolean ellipsoid with ``semi_axes`` in physical units on a grid of ``spacing``."""
    grid = np.indices(shape, dtype=np.float64)
    return sum(((g - c) * s / a) ** 2 for g, c, a, s in zip(grid, centre, semi_axes, spacing)) <= 1


def test_ellipsoid_volume_centroid_and_diameter_follow_anisotropic_spacing():
    spacing = (2.0, 0.5, 0.25)  # z voxels 8x longer than x
    semi = (18.0, 12.0, 7.0)  # um
    labels = np.zeros((40, 100, 120), dtype=np.uint16)
    labels[ellipsoid(labels.shape, (20, 50, 60), semi, spacing)] = 7
    table = measure(labels, spacing=spacing, origin=(100.0, 0.0, -5.0))
    volume = 4 / 3 * np.pi * np.prod(semi)
    assert table["label"].tolist() == [7]
    assert table["volume"][0] == pytest.approx(volume, rel=0.03)
    assert table["voxels"][0] == int((labels == 7).sum())
    # the voxel count alone would be 8x off in one direction: the volume is calibrated
    assert table["volume"][0] == pytest.approx(table["voxels"][0] * 0.25, rel=1e-9)
    assert (table["centroid_z"][0], table["centroid_y"][0], table["centroid_x"][0]) == \
        pytest.approx((100 + 20 * 2.0, 50 * 0.5, -5 + 60 * 0.25), abs=1e-6)
    assert table["equivalent_diameter"][0] == pytest.approx(2 * np.prod(semi) ** (1 / 3), rel=0.02)
    assert 0.85 < table["solidity"][0] <= 1
    for axis, size in zip("zyx", semi):
        extent = (table[f"bbox_{axis}_stop"][0] - table[f"bbox_{axis}_start"][0])
        step = dict(zip("zyx", spacing))[axis]
        assert extent * step == pytest.approx(2 * size, abs=2 * step)
    assert list(table) == list(column_units(3))


def test_2d_columns_area_perimeter_eccentricity_and_intensity():
    labels = np.zeros((80, 80), dtype=np.int32)
    yy, xx = np.indices(labels.shape)
    labels[(yy - 40) ** 2 + (xx - 25) ** 2 < 15 ** 2] = 1  # a disk
    labels[10:20, 50:75] = 2  # a 10 x 25 bar
    image = np.where(labels == 2, 9.0, 1.0)
    image[40, 25] = 30.0
    table = measure(labels, image, spacing=(0.5, 0.5))
    assert table["area"] == pytest.approx([np.pi * 7.5 ** 2, 12.5 * 5], rel=0.03)
    assert table["perimeter"][0] == pytest.approx(2 * np.pi * 7.5, rel=0.06)
    assert table["perimeter"][1] == pytest.approx(2 * (12.5 + 5), rel=0.1)
    assert table["eccentricity"][0] < 0.1 and table["eccentricity"][1] > 0.9
    assert table["solidity"] == pytest.approx([1, 1], abs=0.05)
    assert table["max_intensity"].tolist() == [30.0, 9.0]
    assert table["min_intensity"].tolist() == [1.0, 9.0]
    assert list(table) == list(column_units(2, intensity=True))


def test_anisotropic_2d_perimeter_is_calibrated():
    labels = np.zeros((60, 60), dtype=np.uint8)
    labels[10:30, 10:50] = 1  # 20 rows x 40 columns
    table = measure(labels, spacing=(2.0, 0.5))  # 40 x 20 um
    assert table["area"][0] == pytest.approx(800)
    assert table["perimeter"][0] == pytest.approx(2 * (40 + 20), rel=0.05)


def test_solidity_of_flat_boxes_and_concave_objects():
    labels = np.zeros((5, 20, 20), dtype=np.uint8)
    labels[2, 5:9, 5] = 3  # one line of voxels: convex
    labels[1:4, 10:15, 10:15] = 4  # a box
    labels[0:2, 0:4, 12:20] = 5
    labels[0:2, 0:8, 12:14] = 5  # an L: its hull holds the corner it misses
    table = measure(labels, spacing=(3.0, 1.0, 1.0))
    assert table["solidity"][:2] == pytest.approx([1.0, 1.0])
    # per slice: 40 pixels; the hull of the corners (0,0) (0,8) (4,8) (8,2) (8,0) has 52
    assert table["solidity"][2] == pytest.approx(40 / 52)
    flat = np.zeros((1, 10, 10), dtype=np.uint8)
    flat[0, 2, 2:7] = 1  # one row in 2D: no hull area for qhull; not a crash, not above 1
    solidity = measure(flat[0])["solidity"][0]
    assert np.isnan(solidity) or 0 < solidity <= 1


def test_empty_labels_give_an_empty_table_with_all_columns():
    table = measure(np.zeros((4, 10, 10), dtype=np.uint8), np.ones((4, 10, 10)))
    assert list(table) == list(column_units(3, intensity=True))
    assert all(len(v) == 0 for v in table.values())


def test_measuring_yields_progress_in_chunks():
    labels = np.zeros((50, 50), dtype=np.uint16)
    for k in range(10):
        labels[5 * k:5 * k + 3, 2:6] = k + 1
    job = measure_labels(labels, chunk=4)
    steps = []
    table = drain(job, steps.append)
    assert [(p.done, p.total) for p in steps] == [(4, 10), (8, 10), (10, 10)]
    assert table["label"].tolist() == list(range(1, 11))
    assert table["bbox_y_start"].tolist() == [5 * k for k in range(10)]


def test_update_recomputes_only_the_touched_labels():
    rng = np.random.default_rng(0)
    labels = np.zeros((6, 40, 40), dtype=np.uint16)
    for k in range(1, 9):
        z, y, x = rng.integers(0, 4), rng.integers(0, 30), rng.integers(0, 30)
        labels[z:z + 2, y:y + 8, x:x + 8] = k
    image = rng.normal(size=labels.shape)
    spacing = (3.0, 1.0, 1.0)
    table = measure(labels, image, spacing)
    before = labels.copy()
    # one slice's edit: label 2 painted bigger, label 5 erased there, a new label 20
    z = int(np.argwhere(labels == 2)[0][0])
    labels[z][labels[z] == 5] = 0
    labels[z, 0:3, 0:3] = 2
    labels[z, 36:40, 36:40] = 20
    touched = touched_labels(before[z], labels[z])
    assert set(touched.tolist()) <= {2, 5, 20} and {2, 20} <= set(touched.tolist())
    # stale rows of untouched labels are kept as they were: proves nothing else is recomputed
    untouched = ~np.isin(table["label"], touched)
    table["mean_intensity"][untouched] = -99.0
    updated = drain(update_table(table, labels, touched, image, spacing))
    full = measure(labels, image, spacing)
    assert updated["label"].tolist() == full["label"].tolist()
    keep = ~np.isin(updated["label"], touched)
    assert np.all(updated["mean_intensity"][keep] == -99.0)
    for name in full:
        np.testing.assert_allclose(updated[name][~keep], full[name][~keep], equal_nan=True)
        if name != "mean_intensity":
            np.testing.assert_allclose(updated[name], full[name], equal_nan=True)


def test_sort_rows_puts_nan_last_both_ways():
    table = {"v": np.array([2.0, np.nan, 1.0, 3.0])}
    assert sort_rows(table, "v").tolist() == [2, 0, 3, 1]
    assert sort_rows(table, "v", descending=True).tolist() == [3, 0, 2, 1]


def test_bad_inputs_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="shape"):
        measure(np.zeros((5, 5), int), np.zeros((5, 6)))
    with pytest.raises(ValueError, match="spacing"):
        measure(np.zeros((5, 5), int), spacing=(1.0, 0.0))
    with pytest.raises(ValueError, match="integers"):
        measure(np.zeros((5, 5), float))
