"""Per-label statistics of a label image."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from napari_unet.labels.dtypes import _as_label_array, _label_sizes
from napari_unet.labels.watershed import _check_sampling

# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------


def label_statistics(
    labels: np.ndarray, voxel_size: float | Sequence[float] | None = None
) -> dict[str, float | int]:
    """Count and measure the objects of a label image.

    Parameters
    ----------
    labels : numpy.ndarray
        Integer instance labels, or a bool mask (objects = connected components).
    voxel_size : float or sequence of float, optional
        Voxel size per axis; volumes are in voxels when ``None``.

    Returns
    -------
    dict
        ``objects`` (count), ``voxels`` (foreground voxels), ``volume`` (calibrated),
        ``mean_voxels`` and ``mean_volume`` (per object, 0 without objects).
    """
    arr = _as_label_array(labels)
    if arr.dtype == bool:
        n_objects = int(ndi.label(arr)[1])
        n_voxels = int(np.count_nonzero(arr))
    else:
        ids, sizes = _label_sizes(arr)
        n_objects = len(ids)
        n_voxels = int(sizes.sum())
    spacing = _check_sampling(voxel_size, arr.ndim)
    voxel_volume = float(np.prod(spacing)) if spacing else 1.0
    volume = n_voxels * voxel_volume
    return {
        "objects": n_objects,
        "voxels": n_voxels,
        "volume": volume,
        "mean_voxels": n_voxels / n_objects if n_objects else 0.0,
        "mean_volume": volume / n_objects if n_objects else 0.0,
    }
