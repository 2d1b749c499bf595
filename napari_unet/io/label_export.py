"""Exporting a labels array: as it is, as instances or as a binary mask, to a calibrated TIFF
or an OME-Zarr (with its image), optionally with its probability map; and the one-line
summary of what was written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Generator

import numpy as np

from napari_unet.io.export_paths import check_label_suffix, is_ome_zarr_export, probability_path
from napari_unet.io.writers import write_image_tiff, write_labels_tiff
from napari_unet.labels import edits, statistics

#: ``as in the layer`` (default) writes the ids as they are: an instance layer as instances,
#: classes as classes, a mask as 0/1. ``instances`` also splits a mask into objects;
#: ``binary`` writes foreground = 1 (only when asked)
MODES = ("as in the layer", "instances", "binary")
#: bytes copied per step when an array is snapshot for writing (see :func:`copy_steps`)
COPY_CHUNK_BYTES = 512 * 2**10


def copy_steps(data: Any, chunk_bytes: int | None = None) -> Generator[None, None, np.ndarray]:
    """A generator copying ``data`` along its first axis, a piece (``chunk_bytes``, default
    :data:`COPY_CHUNK_BYTES`) per step; returns the copy."""
    chunk_bytes = chunk_bytes or COPY_CHUNK_BYTES
    out = np.empty(np.shape(data), dtype=data.dtype)
    n = out.shape[0] if out.ndim else 0
    if n == 0:
        out[...] = data
        return out
    step = max(1, chunk_bytes // max(1, out.nbytes // n))
    for lo in range(0, n, step):
        out[lo:lo + step] = data[lo:lo + step]
        yield
    return out


def labels_for_export(data: np.ndarray, mode: str) -> np.ndarray:
    """The array written for ``mode``: ``as in the layer`` = unchanged, ``binary`` = 0/1,
    ``instances`` = one id per object (a binary mask is split into its connected objects)."""
    data = np.asarray(data)
    if mode == MODES[0]:
        return data
    if mode == "binary":
        return edits.instances_to_binary(data).astype(np.uint8)
    if mode == "instances":
        if data.size and int(data.max()) <= 1:  # a binary mask: split it into objects
            return edits.binary_to_instances(data > 0)
        return data
    raise ValueError(f"unknown export mode {mode!r}; choose one of {', '.join(MODES)}")


def summary_line(labels: np.ndarray, voxel_size: tuple[float, ...], unit: str) -> str:
    """``"54 objects, 12 345 voxels, volume 1 234.5 um³"``."""
    stats = statistics.label_statistics(labels, voxel_size)
    power = "³" if labels.ndim == 3 else "²"
    return (f"{stats['objects']} objects, {stats['voxels']} voxels, volume "
            f"{stats['volume']:.4g} {unit}{power} (mean {stats['mean_volume']:.4g} {unit}{power})")


def probabilities_for_export(probabilities: np.ndarray, labels_ndim: int) -> tuple[np.ndarray, str]:
    """The probability map as written (float32 in 0..1, a single channel without its axis)
    and its TIFF axes."""
    raw = np.asarray(probabilities)
    probs = raw.astype(np.float32, copy=False)
    if raw.dtype == np.uint8:  # stored as 0..255
        probs = probs / np.float32(255)
    probs = probs[0] if probs.shape[0] == 1 else probs
    axes = ("C" if probs.ndim > labels_ndim else "") + ("ZYX" if labels_ndim == 3 else "YX")
    return probs, axes


def export_labels(path: str | Path, data: np.ndarray, *, mode: str, voxel_size: tuple[float, ...],
                  unit: str, input_path: str | None = None,
                  probabilities: np.ndarray | None = None, image: Any = None,
                  name: str = "labels") -> tuple[list[Path], str]:
    """Write the labels (and optionally the probabilities) atomically; returns paths and summary.

    A ``.ome.zarr`` path writes an OME-Zarr image: ``image`` (the intensities the labels belong
    to, same shape; else the image read from ``input_path``) with the labels as
    ``labels/<name>``, both multiscale.
    """
    path = check_label_suffix(Path(path))
    labels = labels_for_export(data, mode)
    if is_ome_zarr_export(path):
        written = [export_ome_zarr(path, labels, image=image, input_path=input_path,
                                   voxel_size=voxel_size, unit=unit, name=name)]
    else:
        written = [write_labels_tiff(path, labels, voxel_size=voxel_size, unit=unit,
                                     input_path=input_path)]
    if probabilities is not None:
        probs, axes = probabilities_for_export(probabilities, labels.ndim)
        written.append(write_image_tiff(probability_path(path), probs, voxel_size=voxel_size,
                                        unit=unit, input_path=input_path, axes=axes))
    return written, summary_line(labels, voxel_size, unit)


def export_ome_zarr(path: Path, labels: np.ndarray, *, image: Any, input_path: str | None,
                    voxel_size: tuple[float, ...], unit: str, name: str = "labels") -> Path:
    """Write ``labels`` under ``labels/<name>`` of an OME-Zarr of ``image`` (see
    :func:`export_labels`)."""
    from napari_unet.io.omezarr import write_ome_zarr
    from napari_unet.progress import drain

    if input_path and path.resolve() == Path(input_path).expanduser().resolve():
        raise ValueError("refusing to overwrite the input image; choose another file")
    if image is None and input_path:
        from napari_unet.io.lazy import open_lazy

        try:
            opened = open_lazy(input_path, allow_channels=True)
        except Exception:  # noqa: BLE001 - unreadable: refused below like a missing image
            opened = None
        if opened is not None and "C" not in opened.axes:
            image = opened.data
    if image is None or tuple(np.shape(image)) != labels.shape:
        raise ValueError("an OME-Zarr export holds the image with its labels: open the image "
                         f"of shape {labels.shape} in the viewer (or export to .tif)")
    axes = "ZYX"[-labels.ndim:]
    label_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "labels"
    return drain(write_ome_zarr(path, image, {label_name: labels}, axes=axes,
                                voxel_size=voxel_size, unit=unit))
