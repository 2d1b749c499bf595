import numpy as np
import pytest
import torch

from napari_unet.model.config import UNetConfig
from napari_unet.model.unet import UNet, build_model, fuse_for_inference

from ..conftest import randomize_batch_norm


@pytest.mark.parametrize("dims,shape", [(2, (2, 1, 37, 53)), (3, (1, 1, 9, 21, 18))])
@pytest.mark.parametrize("norm", ["batch", "group", "instance"])
def test_odd_sizes_keep_their_shape(dims, shape, norm):
    net = UNet(UNetConfig(spatial_dims=dims, out_channels=3, base_channels=4, depth=3, norm=norm)).eval()
    with torch.inference_mode():
        out = net(torch.randn(shape))
    assert out.shape == (shape[0], 3, *shape[2:])


def test_one_class_for_2d_and_3d_with_shared_blocks():
    net2 = UNet(spatial_dims=2, base_channels=4, depth=2)
    net3 = UNet(spatial_dims=3, base_channels=4, depth=2)
    assert type(net2) is type(net3)
    assert isinstance(net2.encoders[0][0], torch.nn.Conv2d)
    assert isinstance(net3.encoders[0][0], torch.nn.Conv3d)


def test_depth_and_width_configurable():
    net = UNet(UNetConfig(spatial_dims=2, base_channels=6, depth=5))
    assert len(net.encoders) == 5 and len(net.decoders) == 4
    assert net.encoders[-1].conv[0].out_channels == 6 * 16


def test_anisotropic_pooling_keeps_z():
    config = UNetConfig(spatial_dims=3, base_channels=4, depth=4, inplane_only_levels=(0, 1))
    assert config.pool_factors() == [(1, 2, 2), (1, 2, 2), (2, 2, 2)]
    assert config.divisor() == (2, 8, 8)
    net = UNet(config).eval()
    captured = []
    net.encoders[-1].register_forward_hook(lambda m, i, o: captured.append(o.shape))
    with torch.inference_mode():
        out = net(torch.randn(1, 1, 5, 19, 30))
    assert out.shape == (1, 1, 5, 19, 30)
    # z went through one pooling (6 -> 3), y/x through three (24 -> 3, 32 -> 4)
    assert tuple(captured[0][2:]) == (3, 3, 4)


def test_invalid_configs_are_refused():
    with pytest.raises(ValueError, match="spatial_dims"):
        UNetConfig(spatial_dims=4)
    with pytest.raises(ValueError, match="norm"):
        UNetConfig(norm="layer")
    with pytest.raises(ValueError, match="inplane_only_levels"):
        UNetConfig(spatial_dims=2, inplane_only_levels=(0,))
    with pytest.raises(ValueError, match="inplane_only_levels"):
        UNetConfig(spatial_dims=3, depth=3, inplane_only_levels=(2,))


def test_wrong_input_rank_has_clear_message():
    net = UNet(UNetConfig(spatial_dims=3, base_channels=2, depth=2))
    with pytest.raises(ValueError, match="3D UNet needs"):
        net(torch.randn(1, 1, 16, 16))


def test_config_round_trip():
    config = UNetConfig(spatial_dims=3, base_channels=8, depth=3, norm="group", inplane_only_levels=(0,))
    assert UNetConfig.from_dict(config.to_dict()) == config
    assert isinstance(build_model(config.to_dict()), UNet)


@pytest.mark.parametrize("dims,shape,config", [
    (2, (3, 1, 45, 70), {}),
    (3, (1, 1, 13, 30, 41), {}),
    (3, (2, 1, 7, 40, 22), {"inplane_only_levels": (0,)}),
])
def test_low_memory_forward_equals_forward(dims, shape, config):
    torch.manual_seed(1)
    net = randomize_batch_norm(UNet(UNetConfig(spatial_dims=dims, out_channels=2, base_channels=4,
                                               depth=3, **config))).eval()
    x = torch.randn(shape)
    with torch.inference_mode():
        expected = net(x)
        for slab in (7, 64, 10_000):
            assert torch.allclose(net.forward_low_memory(x, slab_voxels=slab), expected, atol=1e-5)


def test_fused_network_matches():
    torch.manual_seed(2)
    net = randomize_batch_norm(UNet(UNetConfig(spatial_dims=2, base_channels=4, depth=3))).eval()
    fused = fuse_for_inference(net)
    x = torch.randn(2, 1, 40, 40)
    with torch.inference_mode():
        assert torch.allclose(fused(x), net(x), atol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    # the original keeps its batch norms (fusing works on a copy)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


def _influence_radius(net: UNet, size: int, axis: int) -> int:
    """How far (pixels) from an input change the output still changes, measured."""
    x = torch.zeros((1, 1) + (size,) * net.config.spatial_dims)
    centre = [size // 2] * net.config.spatial_dims
    y = x.clone()
    y[(0, 0, *centre)] = 10.0
    with torch.inference_mode():
        diff = (net(y) - net(x)).abs()[0, 0]
    profile = diff.amax(dim=tuple(d for d in range(net.config.spatial_dims) if d != axis))
    changed = np.nonzero(profile.numpy() > 0)[0]
    return int(max(abs(changed - size // 2)))


@pytest.mark.parametrize("config", [
    UNetConfig(spatial_dims=2, base_channels=2, depth=3),
    UNetConfig(spatial_dims=3, base_channels=2, depth=3, inplane_only_levels=(0,)),
])
def test_receptive_radius_bounds_the_real_one(config):
    torch.manual_seed(0)
    net = randomize_batch_norm(UNet(config)).eval()
    for axis, bound in enumerate(config.receptive_radius()):
        measured = _influence_radius(net, 2 * bound + 24, axis)
        assert measured <= bound
        assert measured >= bound // 2  # the bound is not absurdly loose
    assert all(h % d == 0 and h >= r for h, d, r in
               zip(config.halo(), config.divisor(), config.receptive_radius()))
