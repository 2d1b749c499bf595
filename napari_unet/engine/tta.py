"""Test-time augmentation: the in-plane dihedral transforms and their inverses."""

from __future__ import annotations

from typing import Sequence

import torch

#: a test-time augmentation: (quarter turns in the y-x plane, flip x first, flip z)
Transform = tuple[int, bool, bool]


def tta_transforms(spatial_dims: int) -> list[Transform]:
    """The 8 test-time augmentations: the symmetries of the square in the y-x plane (4 quarter
    turns, each with and without an x flip).

    In 3D, z is flipped for the odd quarter turns too: the 8 transforms stay a group (so the
    averaged prediction is exactly invariant under them) at the cost of 8 passes, not 16.
    """
    return [(turns, flip, spatial_dims == 3 and turns % 2 == 1)
            for flip in (False, True) for turns in range(4)]


def _pad_to_grid(batch: torch.Tensor, divisor: Sequence[int]) -> torch.Tensor:
    """``batch`` padded with edge values at the far end of every spatial axis to a multiple of
    ``divisor``: what the network does to its input, done before a transform moves the end."""
    padding: list[int] = []
    for size, div in zip(reversed(batch.shape[2:]), reversed(tuple(divisor))):
        padding += [0, (-size) % div]
    if not any(padding):
        return batch
    return torch.nn.functional.pad(batch, padding, mode="replicate")


def _transform(batch: torch.Tensor, transform: Transform) -> torch.Tensor:
    turns, flip, flip_z = transform
    if flip:
        batch = torch.flip(batch, (-1,))
    if turns:
        batch = torch.rot90(batch, turns, (-2, -1))
    if flip_z:
        batch = torch.flip(batch, (-3,))
    return batch


def _untransform(batch: torch.Tensor, transform: Transform) -> torch.Tensor:
    turns, flip, flip_z = transform
    if flip_z:
        batch = torch.flip(batch, (-3,))
    if turns:
        batch = torch.rot90(batch, -turns, (-2, -1))
    if flip:
        batch = torch.flip(batch, (-1,))
    return batch
