"""The distillation teacher: the start model's output that fine-tuning keeps on the voxels
nobody annotated (Learning without Forgetting, :func:`losses.distillation_loss`).

By default the teacher (the start model, batch norm folded) runs on every training patch, as
the student sees it. With ``TrainingConfig.predict_teacher``, as Li and Hoiem (2016) do (they
record the old network's responses on the new task's images once, before training), and when
the training items are small enough (:data:`PREDICTED_VOXELS`), the start model's probabilities
of every training head are predicted once for the whole items, tiled and exact
(:func:`teacher_maps`), and each patch cuts them out with the same flips, rotations and elastic
field as its labels (:func:`sampling.sample_patches`). No teacher forward runs per step (it was
a third of a 3D UNet++ step). The target is then the start model's
prediction of the image as the user saw it segmented, whole (not a patch's view of it, whose
borders lack context):

* geometric augmentation moves voxels, so the recorded output moves with them, as the labels do;
* intensity augmentation and noise move no voxel: the right output of each voxel stays what the
  start model said of the clean image, as the labels stay the labels. (A teacher run on the
  noisy patch would ask the student to repeat the teacher's own errors under that noise.)

Larger items fall back to the teacher network run on every patch (:class:`Teacher`). Measured
(bench_hitl's nuclei-3d loop, 3 slice choices x 4 seeds, 60 iterations, validation at the end):
the predicted target differs from the per-patch one by 0.10 on average on the unannotated voxels
of augmented patches (0.05 without augmentation: the patch's borders lack context), so it pulls
the weights from the first step, and the 3 fine-tunes the guard kept with it were worse than the
start model (F1 -0.036 and -0.004, Dice -0.006), where the per-patch teacher's 2 kept ones gained
(F1 0.933 -> 0.966 both). Hence it is off by default.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from napari_unet.engine.tiling import plan_run
from napari_unet.model.precision import PrecisionPolicy, prepare_batch
from napari_unet.model.unet import UNet, fuse_for_inference
from napari_unet.training.sampling import _Item

#: the teacher's output is predicted once when the items with unannotated voxels have at most
#: this many voxels in all (predicting costs about as much as the per-step teacher of 64
#: steps of a 3D model; its maps take 2 bytes per voxel and output): else it runs per step
PREDICTED_VOXELS = 2**23
#: voxels (with halo) of one tile of that prediction
_TILE_VOXELS = 2**20


def _probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    logits = logits.float()
    return torch.softmax(logits, dim=1) if task == "semantic" else torch.sigmoid(logits)


def _heads(network: UNet, x: torch.Tensor) -> list[torch.Tensor]:
    """The network's training outputs (all heads with deep supervision)."""
    return network.forward_heads(x) if network.config.deep_supervision else [network(x)]


@torch.no_grad()
def teacher_maps(network: UNet, image: np.ndarray, task: str, policy: PrecisionPolicy,
                 device: torch.device, tile_voxels: int = _TILE_VOXELS) -> np.ndarray:
    """Probabilities of every training head of ``network`` (eval mode) on a normalised
    ``image``, ``(heads * channels, *spatial)`` float16, heads in :meth:`UNet.forward_heads`
    order.

    Tiled with the network's halo on its pooling grid (as the inference engine tiles), so the
    result equals that of the whole image in one pass, whatever ``tile_voxels``.
    """
    config = network.config
    plan = plan_run(image.shape, config.halo(), config.divisor(), max_voxels=tile_voxels,
                    slicewise=False, has_channels=False)
    heads = config.final_level() if config.deep_supervision else 1
    out = np.empty((heads * config.out_channels, *image.shape), dtype=np.float16)
    for tile in plan.tiles():
        x = torch.from_numpy(np.ascontiguousarray(image[tile.read], dtype=np.float32))[None, None]
        x = prepare_batch(x.to(device), policy)
        with torch.inference_mode(), policy.autocast():
            outputs = _heads(network, x)
        probs = torch.cat([_probabilities(o, task) for o in outputs], dim=1)[0]
        out[(slice(None), *tile.write)] = probs[(slice(None), *tile.crop)].cpu().numpy()
    return out


class Teacher:
    """The start model as the distillation teacher of one run.

    ``predicted``: its output is in the items (``_Item.teacher``, see :func:`start_teacher`)
    and travels with each patch; otherwise :attr:`network` runs on every patch.
    """

    def __init__(self, network: UNet, task: str, predicted: bool):
        self.network = None if predicted else network
        self.task = task
        self.predicted = predicted
        self.heads = network.config.final_level() if network.config.deep_supervision else 1
        self.channels = network.config.out_channels

    def targets(self, x: torch.Tensor, maps: torch.Tensor | None) -> list[torch.Tensor]:
        """The teacher's probabilities for each training head of a batch ``x``: cut from the
        predicted ``maps`` (the batch's teacher patches), or by a forward pass."""
        if self.predicted:
            if maps is None:
                raise ValueError("the teacher's output was predicted, but the batch carries none")
            return list(maps.float().split(self.channels, dim=1))
        with torch.no_grad():
            return [_probabilities(o, self.task) for o in _heads(self.network, x)]


def start_teacher(parent: UNet, items: Sequence[_Item], task: str, policy: PrecisionPolicy,
                  device: torch.device, budget: int | None = None) -> Teacher | None:
    """The teacher of a fine-tuning run: None when every voxel of every item is annotated
    (nothing to distil); else with its output predicted into ``items`` (``_Item.teacher``; the
    items without unannotated voxels get None) when they have at most ``budget`` voxels
    (default :data:`PREDICTED_VOXELS`), or a network run per step."""
    distilled = [item for item in items if item.mask is not None and not item.mask.all()]
    if not distilled:
        return None
    network = fuse_for_inference(parent)  # frozen, batch norm folded
    network.to(device, memory_format=policy.memory_format(network.spatial_dims)).requires_grad_(False)
    budget = PREDICTED_VOXELS if budget is None else budget
    predicted = sum(item.image.size for item in distilled) <= budget
    if predicted:
        for item in items:
            item.teacher = None
        for item in distilled:
            item.teacher = teacher_maps(network, item.image, task, policy, device)
    return Teacher(network, task, predicted)


def release_teacher(items: Sequence[_Item]) -> None:
    """Drop the predicted teacher maps of ``items`` (the run is over)."""
    for item in items:
        item.teacher = None
