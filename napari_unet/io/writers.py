"""Writing calibrated TIFFs of images and labels (ImageJ-compatible where the dtype allows it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tifffile

from napari_unet.io.files import _refuse_input_overwrite, atomic_write
from napari_unet.io.formats import IMAGEJ_DTYPES, PathLike, normalize_unit
from napari_unet.io.readers import _valid_size
from napari_unet.labels.dtypes import smallest_label_dtype


def _check_voxel_size(
    voxel_size: Sequence[float] | None, n_spatial: int
) -> tuple[float, ...] | None:
    if voxel_size is None:
        return None
    sizes = tuple(float(v) for v in voxel_size)
    if len(sizes) != n_spatial:
        raise ValueError(
            f"voxel_size has {len(sizes)} values but the data has {n_spatial} spatial axes"
        )
    if not all(_valid_size(v) for v in sizes):
        raise ValueError(f"voxel_size must be positive and finite, got {sizes}")
    return sizes


def _default_axes(ndim: int) -> str:
    if ndim == 2:
        return "YX"
    if ndim == 3:
        return "ZYX"
    raise ValueError(f"data must be 2D (YX) or 3D (ZYX), got {ndim} dimensions; pass axes=")


def _imagej_compatible(data: np.ndarray) -> np.ndarray:
    """Cast to a dtype ImageJ stores (uint8, uint16, float32) without changing values."""
    if data.dtype in IMAGEJ_DTYPES:
        return data
    if data.dtype == np.bool_:
        return data.astype(np.uint8)
    if np.issubdtype(data.dtype, np.floating):
        return data.astype(np.float32)
    if np.issubdtype(data.dtype, np.integer):
        low = int(data.min()) if data.size else 0
        high = int(data.max()) if data.size else 0
        for dtype in (np.uint8, np.uint16):
            info = np.iinfo(dtype)
            if info.min <= low and high <= info.max:
                return data.astype(dtype)
        if -(2**24) <= low and high <= 2**24:  # float32 holds these integers exactly
            return data.astype(np.float32)
    raise ValueError(
        f"ImageJ TIFF cannot store {data.dtype} values in [{data.min()}, {data.max()}]; "
        "pass imagej=False"
    )


def write_tiff_atomic(
    path: PathLike,
    data: np.ndarray,
    *,
    voxel_size: Sequence[float] | None = None,
    unit: str = "um",
    input_path: PathLike | None = None,
    compression: str | None = "zlib",
    imagej: bool = True,
    axes: str | None = None,
) -> Path:
    """Write an array as a calibrated TIFF, atomically (see :func:`atomic_write`).

    Parameters
    ----------
    path : str or os.PathLike
        Destination file.
    data : numpy.ndarray
        ``(Y, X)`` or ``(Z, Y, X)``; with ``axes`` also ``"CYX"`` / ``"CZYX"``. Never modified.
    voxel_size : sequence of float, optional
        One size per spatial axis (``(z, y, x)`` or ``(y, x)``), in ``unit``.
    unit : str
        Length unit of ``voxel_size``, e.g. ``"um"`` or ``"mm"``.
    input_path : str or os.PathLike, optional
        The image the data came from: writing to it is refused.
    compression : str or None
        tifffile compression (``"zlib"`` is read by Fiji, napari and tifffile); None for none.
    imagej : bool
        Write an ImageJ hyperstack (uint8, uint16 or float32; other dtypes are cast when the
        values fit, else ValueError). Otherwise a plain TIFF with the calibration in tifffile's
        JSON description and the resolution tags, read back by :func:`read_image`.
    axes : str, optional
        Axes of ``data``: ``"YX"``, ``"ZYX"``, ``"CYX"`` or ``"CZYX"``; default from ``ndim``.

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    ValueError
        ``path`` is the input image; bad ``voxel_size``, ``axes`` or dtype.
    """
    path = Path(path).expanduser()
    _refuse_input_overwrite(path, input_path)
    data = np.asarray(data)
    axes = (axes or _default_axes(data.ndim)).upper()
    if axes not in ("YX", "ZYX", "CYX", "CZYX") or len(axes) != data.ndim:
        raise ValueError(
            f"axes must be YX, ZYX, CYX or CZYX matching data {data.shape}, got {axes!r}"
        )
    spatial = axes.replace("C", "")
    sizes = _check_voxel_size(voxel_size, len(spatial))
    unit_name = normalize_unit(unit) or "um"

    resolution_kwargs: dict[str, Any] = {}
    if sizes is not None:
        # tifffile's resolution is (X, Y) in pixels per unit.
        resolution_kwargs = {
            "resolution": (1.0 / sizes[-1], 1.0 / sizes[-2]),
            "resolutionunit": "NONE",
        }

    if imagej:
        out = _imagej_compatible(data)
        out_axes = axes
        if axes == "CZYX":  # ImageJ orders hyperstacks TZCYXS
            out = out.transpose(1, 0, 2, 3)
            out_axes = "ZCYX"
        metadata: dict[str, Any] = {"axes": out_axes}
        if sizes is not None:
            metadata["unit"] = unit_name
            if "Z" in spatial:
                metadata["spacing"] = sizes[0]
        writer_kwargs: dict[str, Any] = {"imagej": True, "metadata": metadata}
    else:
        out = data
        metadata = {"axes": axes}
        if sizes is not None:
            metadata.update(unit=unit_name, voxel_size=list(sizes))
            if "Z" in spatial:
                metadata["spacing"] = sizes[0]
        writer_kwargs = {"metadata": metadata, "bigtiff": out.nbytes > 2**31}

    def write(tmp: Path) -> None:
        tifffile.imwrite(
            tmp,
            out,
            photometric="minisblack",
            compression=compression,
            **resolution_kwargs,
            **writer_kwargs,
        )

    return atomic_write(path, write)


def write_image_tiff(
    path: PathLike,
    image: np.ndarray,
    *,
    voxel_size: Sequence[float] | None = None,
    unit: str = "um",
    input_path: PathLike | None = None,
    compression: str | None = "zlib",
    axes: str | None = None,
) -> Path:
    """Write an intensity image or probability map (float32 or uint8) as an ImageJ TIFF.

    float64/float16 are stored as float32. See :func:`write_tiff_atomic` for the parameters.
    """
    return write_tiff_atomic(
        path,
        image,
        voxel_size=voxel_size,
        unit=unit,
        input_path=input_path,
        compression=compression,
        imagej=True,
        axes=axes,
    )


def write_labels_tiff(
    path: PathLike,
    labels: np.ndarray,
    *,
    voxel_size: Sequence[float] | None = None,
    unit: str = "um",
    input_path: PathLike | None = None,
    compression: str | None = "zlib",
) -> Path:
    """Write a label image as a compressed TIFF in the smallest dtype that fits.

    Parameters
    ----------
    path : str or os.PathLike
        Destination file.
    labels : numpy.ndarray
        ``(Y, X)`` or ``(Z, Y, X)`` non-negative integers (or bool). Never modified.
    voxel_size, unit, input_path, compression
        As in :func:`write_tiff_atomic`.

    Returns
    -------
    pathlib.Path
        The written file.

    Notes
    -----
    Labels up to 65535 are written as an ImageJ hyperstack (uint8 or uint16), opened
    calibrated by Fiji and napari. ImageJ cannot store uint32/uint64, so larger labels go to a
    plain TIFF holding the same calibration in its resolution tags and tifffile's JSON
    description: :func:`read_image`, tifffile and napari read it back, Fiji (Bio-Formats) reads
    the pixels but may not show the z spacing.
    """
    labels = np.asarray(labels)
    if labels.dtype != np.bool_ and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if labels.size and np.issubdtype(labels.dtype, np.signedinteger) and labels.min() < 0:
        raise ValueError(f"labels must be >= 0, got minimum {labels.min()}")
    max_label = int(labels.max()) if labels.size else 0
    dtype = smallest_label_dtype(max_label)
    return write_tiff_atomic(
        path,
        labels.astype(dtype, copy=False),  # a new array whenever the dtype changes
        voxel_size=voxel_size,
        unit=unit,
        input_path=input_path,
        compression=compression,
        imagej=dtype in IMAGEJ_DTYPES,
    )
