"""Membrane cells the PlantSeg way: distance-transform seeds, watershed, border agglomeration."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unet.labels import instances
from napari_unet.labels.membranes import agglomerate, estimate_radius, membrane_instances


def _grid(shape=(60, 90), rows=(29,), cols=(29, 59), width=2, value=0.95) -> np.ndarray:
    membrane = np.full(shape, 0.05, np.float32)
    for row in rows:
        membrane[..., row:row + width, :] = value
    for col in cols:
        membrane[..., col:col + width] = value
    return membrane


def test_a_gap_in_a_membrane_does_not_merge_two_cells():
    membrane = _grid()
    membrane[10:16, 29:31] = 0.05  # a 6-pixel hole in the wall between the first two cells
    old = instances.to_instances(membrane[None], "membranes", method="connected_components")
    assert old[5, 10] == old[5, 45]  # components of the interiors leak through the gap
    labels = membrane_instances(membrane, threshold=0.5, object_radius=15)
    assert len(np.unique(labels)) == 6 and labels.min() > 0  # 2 x 3 cells tile the image
    assert labels[5, 10] != labels[5, 45]
    via_task = instances.to_instances(membrane[None], "membranes", object_radius=15)
    assert via_task.max() == 6


def test_oversegmented_regions_merge_along_weak_borders():
    # a dumbbell cell: its distance transform peaks in both bulbs, so the watershed splits it,
    # but the border between the pieces (in the neck) carries no membrane: they merge back
    membrane = np.full((72, 84), 0.95, np.float32)
    membrane[2:32, 2:32] = membrane[2:32, 50:80] = membrane[12:22, 32:50] = 0.05
    membrane[40:70, 2:80] = 0.05  # a second cell, behind a real wall
    unmerged = membrane_instances(membrane, threshold=0.5, object_radius=8, merge_threshold=0)
    assert unmerged[15, 15] != unmerged[15, 65]
    labels = membrane_instances(membrane, threshold=0.5, object_radius=8)
    assert labels[15, 15] == labels[15, 65] == labels[16, 40]
    assert labels[55, 40] != labels[15, 15]
    assert len(np.unique(labels)) == 2


def test_agglomerate_keeps_background_and_strong_borders():
    labels = np.zeros((10, 30), np.int64)
    labels[:, :10], labels[:, 10:20], labels[:, 20:28] = 1, 2, 3
    membrane = np.zeros((10, 30), np.float32)
    membrane[:, 19:21] = 0.9  # strong border between 2 and 3, none between 1 and 2
    out = agglomerate(labels, membrane, 0.5)
    assert np.all(out[:, 28:] == 0)
    assert out[0, 0] == out[0, 15] != out[0, 25]


def test_anisotropic_voxels_are_respected():
    # flat cells in voxels (z sampled 4x coarser): seen isotropically the thin z extent makes
    # many small seeds; with the voxel size the cells are round and stay whole
    membrane = _grid((12, 60, 60), rows=(29,), cols=(29,))
    membrane[[0, -1]] = 0.95
    labels = membrane_instances(membrane, threshold=0.5, sampling=(4, 1, 1), object_radius=14)
    assert len(np.unique(labels[1:-1, 2:-2, 2:-2])) == 4


def test_estimate_radius_of_square_cells():
    cells = _grid() < 0.5
    radius = estimate_radius(cells)
    assert 14 < radius < 18  # 29 x 29 squares: equivalent radius 16.4
    assert estimate_radius(cells, (2.0, 2.0)) == pytest.approx(2 * radius)
