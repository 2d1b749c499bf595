"""models.inplane_only_levels_for: in-plane-only pooling levels from the voxel size."""

from __future__ import annotations

import pytest

from napari_unet.model.config import UNetConfig, inplane_only_levels_for
from napari_unet.model.unet import UNet


@pytest.mark.parametrize("voxel_size, depth, expected", [
    ((1.0, 1.0, 1.0), 4, ()),          # isotropic
    ((3.0, 3.0, 3.0), 4, ()),          # isotropic CT
    ((1.5, 1.0, 1.0), 4, ()),          # mild: not worth it
    ((1.7, 1.0, 1.0), 4, (0,)),        # the CLI's old threshold
    ((0.28, 0.127, 0.127), 4, (0,)),   # nuclei_3d sample (2.2x)
    ((3.4, 1.0, 1.0), 4, (0, 1)),
    ((10.0, 1.0, 1.0), 4, (0, 1, 2)),  # capped at depth - 1
    ((10.0, 1.0, 1.0), 2, (0,)),
    ((1.0, 2.0, 2.0), 4, ()),          # finer in z than in-plane
    (None, 4, ()),
    ((0.5, 0.5), 4, ()),               # 2D
])
def test_levels_from_voxel_size(voxel_size, depth, expected):
    assert inplane_only_levels_for(voxel_size, depth) == expected


def test_levels_build_a_network():
    levels = inplane_only_levels_for((2.0, 0.5, 0.5), 3)
    assert levels == (0, 1)
    UNet(UNetConfig(spatial_dims=3, base_channels=4, depth=3, inplane_only_levels=levels))
