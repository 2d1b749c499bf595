"""Memory budgets and the tile plan of a run (cores, halo, batch)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch

from napari_unet.engine.devices import select_device
from napari_unet.engine.resample import image_halo, network_length
from napari_unet.engine.tiling import TilePlan, plan_run
from napari_unet.model.checkpoint import SegmentationModel
from napari_unet.model.precision import PrecisionPolicy, resolve_precision
from napari_unet.model.unet import UNet

#: CPU working-set cap of one run's tiles: larger tiles compute fewer halo voxels, and past
#: this the halo overhead of the shipped models is small (see ``benchmarks/bench_inference.py``)
CPU_TILE_BUDGET = 8 * 2**30
#: Slices of a 2D model on a stack per forward pass on the CPU (more are no faster there and
#: delay the first results on screen)
CPU_MAX_SLICE_VOXELS = 2**22


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil ships with napari
        return 4 * 2**30


def bytes_per_voxel(network: UNet, device: torch.device, policy: PrecisionPolicy | None = None) -> float:
    """Working-set size per input voxel of one tile (measured: ``benchmarks/bench_inference.py``).

    The slab-wise CPU forward of a unet keeps the skip tensors and a few full-resolution
    temporaries, about 3.7 base-width values per voxel; the plain GPU forward holds about 10.
    Other architectures scale these (:meth:`UNetConfig.activation_widths`).
    """
    config = network.config
    policy = policy or resolve_precision("auto", device)
    value_bytes = 4 if policy.dtype is None else 2
    widths = config.activation_widths(low_memory=device.type == "cpu")
    return widths * config.base_channels * value_bytes + 8 * (config.in_channels + config.out_channels)


def tile_budget(device: torch.device, max_bytes: float | None = None) -> float:
    """Bytes one run's tiles may use: a quarter of free memory (capped on the CPU)."""
    budget = _available_memory(device) / 4
    if device.type == "cpu":
        budget = min(budget, CPU_TILE_BUDGET)
    if max_bytes is not None:
        budget = min(budget, float(max_bytes))
    return budget


def _work_layout(image: Any, network: UNet) -> tuple[bool, bool]:
    """(slicewise, has_channels) for applying ``network`` to ``image``; clear errors otherwise."""
    dims, channels = network.config.spatial_dims, network.config.in_channels
    spatial_ndim = image.ndim - (1 if channels > 1 else 0)
    if channels > 1 and image.shape[0] != channels:
        raise ValueError(f"the model takes {channels} channels (channel axis first); "
                         f"got an image of shape {tuple(image.shape)}")
    if dims == 3 and spatial_ndim != 3:
        raise ValueError(f"this is a 3D model and needs a 3D stack (Z, Y, X); the image has "
                         f"shape {tuple(image.shape)}. Use a 2D model for single images.")
    if dims == 2 and spatial_ndim not in (2, 3):
        raise ValueError(f"a 2D model takes a 2D image or a stack of 2D slices; got shape "
                         f"{tuple(image.shape)}")
    return dims == 2 and spatial_ndim == 3, channels > 1


def make_plan(image: Any, model: SegmentationModel, *, device: str | torch.device = "cpu",
              precision: str = "auto", tile_shape: Sequence[int] | None = None,
              halo: Sequence[int] | None = None, max_bytes: float | None = None,
              batch_size: int | None = None, scale: Sequence[float] | None = None) -> TilePlan:
    """The tile plan for running ``model`` on ``image`` (anything with ``shape``/``ndim``).

    Without ``tile_shape`` the planner picks the tiles that compute the fewest voxels per voxel
    written (:func:`napari_unet.engine.tiling.choose_cores`) within the device's memory budget
    (:func:`tile_budget`, at most ``max_bytes``). ``tile_shape`` is per spatial axis of the
    image; for a 2D model on a stack ``(y, x)`` or ``(slices, y, x)``.

    ``scale`` zooms the image per tile before the network (per model axis, e.g. from
    :func:`napari_unet.labels.object_size.network_scale`; see :mod:`napari_unet.engine.resample`):
    the halo grows by the zoom, ``tile_shape`` and the memory budget count network voxels.
    """
    network = model.network
    slicewise, has_channels = _work_layout(image, network)
    spatial = tuple(int(n) for n in (image.shape[1:] if has_channels else image.shape))
    config = network.config
    net_halo = tuple(int(h) for h in halo) if halo is not None else config.halo()
    if len(net_halo) != config.spatial_dims:
        raise ValueError(f"halo {tuple(net_halo)} does not match the model's {config.spatial_dims} axes")
    work_halo = (0, *net_halo) if slicewise else net_halo
    work_div = (1, *config.divisor()) if slicewise else config.divisor()
    torch_device = select_device(device)
    policy = resolve_precision(precision, torch_device)
    budget = tile_budget(torch_device, max_bytes)
    max_voxels = max(4096, int(budget / bytes_per_voxel(network, torch_device, policy)))
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    max_slices = None
    if slicewise:  # a tile of a stack is a batch of slices
        if batch_size is not None:
            max_slices = int(batch_size)
        elif torch_device.type == "cpu":
            max_slices = max(1, CPU_MAX_SLICE_VOXELS // max(1, spatial[1] * spatial[2]))
    tile = None
    if tile_shape is not None:
        tile = tuple(int(t) for t in tile_shape)
        if slicewise and len(tile) == 2:
            tile = (max_slices or 1, *tile)
    zoom = work_scale(scale, spatial, config.spatial_dims, slicewise)
    if zoom is not None:
        return _scaled_plan(spatial, zoom, work_halo, work_div, max_voxels, slicewise,
                            has_channels, tile, max_slices, batch_size)
    plan = plan_run(spatial, work_halo, work_div, max_voxels=max_voxels, slicewise=slicewise,
                    has_channels=has_channels, tile_shape=tile, max_slices=max_slices)
    if batch_size is not None and not slicewise:
        plan = dataclasses.replace(plan, batch_size=int(batch_size))
    return plan


def work_scale(scale: Sequence[float] | None, spatial: Sequence[int], dims: int,
               slicewise: bool) -> tuple[float, ...] | None:
    """``scale`` per spatial axis of the image (a 2D model on a stack: z is not zoomed), or
    None when no axis changes its length."""
    if scale is None:
        return None
    zoom = tuple(float(s) for s in scale)
    if len(zoom) == 1:
        zoom = zoom * dims
    if len(zoom) != dims:
        raise ValueError(f"scale {zoom} does not match the model's {dims} axes")
    if not all(math.isfinite(s) and s > 0 for s in zoom):
        raise ValueError(f"scale factors must be positive, got {zoom}")
    if slicewise:
        zoom = (1.0, *zoom)
    if all(network_length(n, s) == n for n, s in zip(spatial, zoom)):
        return None
    return zoom


def _scaled_plan(spatial: tuple[int, ...], zoom: tuple[float, ...], net_halo: tuple[int, ...],
                 net_div: tuple[int, ...], max_voxels: int, slicewise: bool, has_channels: bool,
                 tile: tuple[int, ...] | None, max_slices: int | None,
                 batch_size: int | None) -> TilePlan:
    """The plan of a zoomed run: tiles on the image grid whose network windows fit."""
    halo, divisor, ratios = [], [], []
    for n, s, h, d in zip(spatial, zoom, net_halo, net_div):
        m = network_length(n, s)
        ratios.append(m / n)
        if m == n:
            halo.append(h)
            divisor.append(d)
            continue
        # cores of about the network's divisor at least, and a halo that is a multiple of them
        step = max(1, math.ceil(d * n / m))
        divisor.append(step)
        halo.append(math.ceil(image_halo(h, d, n, s) / step) * step)
    if tile is not None:  # network voxels -> image voxels
        tile = tuple(max(1, int(math.ceil(t / r))) for t, r in zip(tile, ratios))
    image_voxels = max(4096, int(max_voxels / math.prod(ratios)))
    plan = plan_run(spatial, halo, divisor, max_voxels=image_voxels, slicewise=slicewise,
                    has_channels=has_channels, tile_shape=tile, max_slices=max_slices)
    plan = dataclasses.replace(plan, scale=zoom, net_halo=net_halo, net_divisor=net_div)
    if batch_size is not None and not slicewise:
        plan = dataclasses.replace(plan, batch_size=int(batch_size))
    return plan


#: above this many voxels computed per voxel written, a plan is worth a warning
_WASTEFUL_PLAN = 3.0


def _plan_warnings(config: Any, plan: TilePlan) -> list[str]:
    """What the user should know about a plan: inexact norms, tiles mostly made of halo."""
    warnings = []
    if config.norm != "batch" and plan.n_tiles > 1:
        # group and instance norm see a whole tile: tiled results differ from untiled ones
        warnings.append(f"this model uses {config.norm} norm, whose tiled result is not exact "
                        "(tile borders can differ); a tile as large as the image (--tile) avoids it")
    if plan.read_per_written > _WASTEFUL_PLAN:
        warnings.append(f"tiles of {plan.tile_shape} leave cores of {plan.core} after the halo "
                        f"{plan.halo}: {plan.read_per_written:.1f} voxels computed per voxel "
                        "written; larger tiles (or more memory) would be faster")
    return warnings
