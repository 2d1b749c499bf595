"""The four architectures of the UNet family: shapes, tile exactness, fusing, slabs, checkpoints."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from napari_unet.engine.predict import predict_probabilities
from napari_unet.model.checkpoint import (
    SegmentationModel,
    load_checkpoint,
    save_checkpoint,
)
from napari_unet.model.config import ARCHITECTURES, UNetConfig
from napari_unet.model.unet import UNet, build_model, fuse_for_inference, init_weights
from napari_unet.progress import drain

from ..conftest import randomize_batch_norm

#: (spatial dims, extra config, odd input shape, forced tile)
GEOMETRIES = {
    "2d": (2, {}, (45, 61), (24, 24)),
    "3d-aniso": (3, {"inplane_only_levels": (0,)}, (13, 30, 27), (6, 8, 8)),
}
CASES = [(arch, geo) for arch in ARCHITECTURES for geo in GEOMETRIES]


def _config(arch: str, geometry: str, **extra) -> UNetConfig:
    dims, config, _, _ = GEOMETRIES[geometry]
    return UNetConfig(spatial_dims=dims, out_channels=2, base_channels=4, depth=3,
                      architecture=arch, **config, **extra)


def _net(config: UNetConfig, seed: int = 1) -> UNet:
    """Random weights (not trained), batch norm in eval mode with non-trivial statistics.

    Kaiming initialisation keeps the deep paths' signal alive (torch's default shrinks it by
    about 3x per layer), so the far ends of the receptive field are measurable.
    """
    torch.manual_seed(seed)
    return randomize_batch_norm(init_weights(UNet(config)), seed).eval()


def _input(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((1, 1, *shape), dtype=np.float32))


@pytest.mark.parametrize("arch,geometry", CASES)
def test_odd_sizes_keep_their_shape(arch, geometry):
    net = _net(_config(arch, geometry))
    shape = GEOMETRIES[geometry][2]
    with torch.inference_mode():
        out = net(_input(shape))
    assert out.shape == (1, 2, *shape)
    assert net.forward_heads(_input(shape))[-1].shape == out.shape


@pytest.mark.parametrize("arch,geometry", CASES)
def test_tiled_equals_untiled(arch, geometry):
    config = _config(arch, geometry)
    net = _net(config)
    _, _, shape, tile = GEOMETRIES[geometry]
    image = np.random.default_rng(1).random(shape, dtype=np.float32)
    model = SegmentationModel(network=net, task="foreground_boundary", normalization={"mode": "none"})
    tiled = drain(predict_probabilities(image, model, device="cpu", precision="fp32",
                                        tile_shape=tile, dtype=np.float32))
    with torch.inference_mode():
        expected = torch.sigmoid(net(torch.from_numpy(image)[None, None]))[0].numpy()
    assert expected.std() > 0.01  # a live network, not a constant
    assert np.abs(tiled - expected).max() < 1e-4


def _changed(net: UNet, x: torch.Tensor, y: torch.Tensor, centre: tuple[int, ...]) -> float:
    with torch.inference_mode():
        return float((net(x) - net(y))[(0, slice(None), *centre)].abs().max())


@pytest.mark.parametrize("arch,geometry", CASES)
def test_receptive_radius_is_exact(arch, geometry):
    """Input changes beyond the radius never reach an output; at the radius they do.

    Which side reaches furthest depends on where the output sits on the pooling grid, so
    every position modulo the divisor is tried.
    """
    config = _config(arch, geometry)
    torch.manual_seed(0)
    net = init_weights(UNet(config)).eval()  # live to the far ends of the field: no random stats
    radius, divisor = config.receptive_radius(), config.divisor()
    for axis in range(config.spatial_dims):
        dim, at_radius = axis + 2, 0.0
        for residue in range(divisor[axis]):
            # the other axes can be short: the perturbation spans them
            centre = tuple(d * ((r + d) // d) + residue if a == axis else d
                           for a, (r, d) in enumerate(zip(radius, divisor)))
            shape = tuple(c + r + 3 if a == axis else 2 * c
                          for a, (c, r) in enumerate(zip(centre, radius)))
            x, noise = _input(shape), _input(shape, seed=5) * 20 - 10
            coords = torch.arange(shape[axis]).reshape([-1 if d == dim else 1 for d in range(x.ndim)])
            offset = (coords - centre[axis]).abs()
            assert _changed(net, x, torch.where(offset > radius[axis], noise, x), centre) < 1e-6
            at_radius = max(at_radius, _changed(net, x, torch.where(offset == radius[axis], noise, x), centre))
        assert at_radius > 1e-5, (axis, at_radius)


@pytest.mark.parametrize("arch,geometry", CASES)
def test_fused_equals_unfused(arch, geometry):
    net = _net(_config(arch, geometry))
    fused = fuse_for_inference(net)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    x = _input(GEOMETRIES[geometry][2]) * 3 - 1
    with torch.inference_mode():
        assert torch.allclose(fused(x), net(x), atol=1e-5)
    assert any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())


@pytest.mark.parametrize("arch,geometry", CASES)
def test_low_memory_forward_equals_forward(arch, geometry):
    net = _net(_config(arch, geometry))
    x = torch.cat([_input(GEOMETRIES[geometry][2], seed) for seed in (0, 1)])
    with torch.inference_mode():
        expected = net(x)
        for slab in (7, 100, 10**6):
            assert torch.allclose(net.forward_low_memory(x, slab_voxels=slab), expected, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_checkpoint_round_trip_records_the_architecture(arch, tmp_path):
    extra = {"deep_supervision": True} if arch == "unetpp" else {}
    net = _net(_config(arch, "3d-aniso", **extra))
    path = save_checkpoint(SegmentationModel(network=net, task="foreground_boundary"), tmp_path / "m.pt")
    loaded = load_checkpoint(path)
    assert loaded.network.config == net.config and loaded.network.config.architecture == arch
    x = _input(GEOMETRIES["3d-aniso"][2])
    with torch.inference_mode():
        assert torch.equal(loaded.network.eval()(x), net(x))


def test_old_config_dict_is_a_unet():
    old = {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "base_channels": 4, "depth": 3,
           "norm": "batch", "inplane_only_levels": []}
    config = UNetConfig.from_dict(old)
    assert (config.architecture, config.deep_supervision, config.output_level) == ("unet", False, None)
    net = build_model(old)
    # the parameter names of the original UNet, so old state dicts load unchanged
    assert {"encoders.0.0.weight", "encoders.1.conv.3.weight", "decoders.0.up.weight",
            "decoders.1.conv.4.running_var", "head.weight"} <= set(net.state_dict())


def test_invalid_architecture_options_are_refused():
    with pytest.raises(ValueError, match="architecture"):
        UNetConfig(architecture="vnet")
    with pytest.raises(ValueError, match="deep_supervision"):
        UNetConfig(architecture="resunet", deep_supervision=True)
    with pytest.raises(ValueError, match="output_level"):
        UNetConfig(architecture="unet", output_level=1)
    with pytest.raises(ValueError, match="output_level"):
        UNetConfig(architecture="unetpp", depth=3, deep_supervision=True, output_level=3)
    with pytest.raises(ValueError, match="deep_supervision"):
        UNetConfig(architecture="unetpp", depth=4, output_level=2)


def test_unet_plus_plus_deep_supervision_heads():
    config = _config("unetpp", "2d", deep_supervision=True)
    net = _net(config)
    x = _input(GEOMETRIES["2d"][2])
    with torch.inference_mode():
        heads = net.forward_heads(x)
        assert len(heads) == config.depth - 1
        assert all(h.shape == (1, 2, *x.shape[2:]) for h in heads)
        assert torch.equal(heads[-1], net(x))
        assert not torch.allclose(heads[0], heads[1])
    plain = _net(_config("unetpp", "2d"))
    assert len(plain.forward_heads(x)) == 1
    assert sum(p.numel() for p in net.parameters()) > sum(p.numel() for p in plain.parameters())


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_pruned_unet_plus_plus_is_the_head_at_that_level(geometry):
    full_config = dataclasses.replace(_config("unetpp", geometry, deep_supervision=True), depth=4)
    full = _net(full_config)
    x = _input(GEOMETRIES[geometry][2])
    with torch.inference_mode():
        heads = full.forward_heads(x)
    previous = full_config.halo()
    for level in (2, 1):
        config = dataclasses.replace(full_config, output_level=level)
        pruned = UNet(config).eval()
        pruned.load_state_dict(full.state_dict())
        calls = []
        hooks = [d.register_forward_hook(lambda *_: calls.append(1)) for d in pruned.decoders]
        with torch.inference_mode():
            assert torch.equal(pruned(x), heads[level - 1])
            assert len(calls) == level * (level + 1) // 2  # only the nodes X^{i,j}, i + j <= level
            for hook in hooks:
                hook.remove()
            assert torch.allclose(pruned.forward_low_memory(x, slab_voxels=50), heads[level - 1], atol=1e-5)
            assert len(pruned.forward_heads(x)) == level
        halo, radius = config.halo(), config.receptive_radius()
        assert all(h <= p for h, p in zip(halo, previous)) and halo != previous
        assert all(r <= h for r, h in zip(radius, halo))
        previous = halo


def test_architectures_share_the_unet_geometry_except_pruning():
    radii = {arch: _config(arch, "3d-aniso").receptive_radius() for arch in ARCHITECTURES}
    assert len(set(radii.values())) == 1
    assert radii["unet"] == (13, 23, 23)  # worked out by hand in UNetConfig.receptive_radius


@pytest.mark.parametrize("arch", ["resunet", "unetpp"])
def test_gradient_checkpointing_gives_the_same_gradients_and_statistics(arch):
    extra = {"deep_supervision": True} if arch == "unetpp" else {}
    config = _config(arch, "2d", **extra)
    x = _input((20, 28), seed=2)
    results = []
    for checkpointing in (False, True):
        net = _net(config).train()
        net.gradient_checkpointing = checkpointing
        loss = sum(h.square().mean() for h in net.forward_heads(x))
        loss.backward()
        grads = [p.grad.clone() for p in net.parameters()]
        stats = [b.clone() for b in net.buffers()]
        results.append((grads, stats))
    (grads_a, stats_a), (grads_b, stats_b) = results
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_a, grads_b))
    # recomputation in backward does not update the running statistics a second time
    assert all(torch.equal(a, b) for a, b in zip(stats_a, stats_b))


def test_gradient_checkpointing_really_recomputes():
    net = _net(_config("unet", "2d")).train()
    net.gradient_checkpointing = True
    calls = []
    net.encoders[0].register_forward_pre_hook(lambda *_: calls.append(1))
    net(_input((16, 16))).sum().backward()
    assert len(calls) == 2
    with torch.no_grad():
        net(_input((16, 16)))
    assert len(calls) == 3


def test_kaiming_init():
    net = UNet(_config("attention", "2d"))
    torch.manual_seed(0)
    init_weights(net, "kaiming")
    conv = net.decoders[0].conv[0]
    fan_out = conv.out_channels * conv.weight[0, 0].numel()
    assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.15)
    norm = net.encoders[1].conv[1]
    norm.weight.data.fill_(3.0)
    init_weights(net)
    assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()
    before = [p.clone() for p in net.parameters()]
    init_weights(net, "default")
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    with pytest.raises(ValueError, match="init"):
        init_weights(net, "xavier")


def test_planner_budgets_more_memory_for_unet_plus_plus():
    from napari_unet.engine.planning import bytes_per_voxel

    cpu = torch.device("cpu")
    sizes = {arch: bytes_per_voxel(UNet(_config(arch, "2d")), cpu) for arch in ARCHITECTURES}
    assert sizes["unetpp"] > max(sizes["unet"], sizes["attention"], sizes["resunet"])
    assert min(sizes.values()) == sizes["unet"]


# --- command line and dialog ---------------------------------------------------------------

@pytest.fixture
def pair(tmp_path):
    import tifffile

    labels = np.zeros((32, 32), np.uint16)
    labels[4:12, 4:12], labels[16:26, 10:20] = 1, 2
    image = ((labels > 0) * 100 + np.random.default_rng(0).normal(10, 3, labels.shape)).astype(np.float32)
    tifffile.imwrite(tmp_path / "image.tif", image)
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    return ["--image", str(tmp_path / "image.tif"), "--labels", str(tmp_path / "labels.tif")]


def test_cli_trains_a_new_architecture_and_keeps_it_when_fine_tuning(pair, tmp_path, capsys):
    from napari_unet.cli import main, train
    from napari_unet.model import config as models_config

    assert train.ARCHITECTURE_CHOICES == models_config.ARCHITECTURES
    tiny = ["--base-channels", "4", "--depth", "3", "--iterations", "1", "--batch-size", "1", "--no-tune"]
    first = tmp_path / "first.pt"
    assert main.main(["train", *pair, "--dims", "2", *tiny, "--architecture", "unetpp",
                     "--deep-supervision", "--init", "default", "-o", str(first)]) == 0
    config = load_checkpoint(first).network.config
    assert (config.architecture, config.deep_supervision) == ("unetpp", True)
    second = tmp_path / "second.pt"
    assert main.main(["train", *pair, "--from", str(first), "--iterations", "1", "--no-tune",
                     "-o", str(second)]) == 0
    assert load_checkpoint(second).network.config == config
    capsys.readouterr()
    assert main.main(["train", *pair, "--from", str(first), "--architecture", "resunet",
                     "-o", str(tmp_path / "x.pt")]) == 2
    assert "only apply to new models" in capsys.readouterr().err
    assert main.main(["train", *pair, "--dims", "2", "--architecture", "attention", "--deep-supervision",
                     "-o", str(tmp_path / "y.pt")]) == 2
    assert "needs --architecture unetpp" in capsys.readouterr().err


def test_new_model_uses_kaiming_unless_told_otherwise():
    from napari_unet.training.trainer import new_model

    kaiming = new_model(2, "foreground", base_channels=4, depth=2, architecture="resunet")
    default = new_model(2, "foreground", base_channels=4, depth=2, architecture="resunet", init="default")
    assert kaiming.network.config.architecture == "resunet"
    conv = kaiming.network.decoders[0].conv.body[0]  # 8 -> 4 channels
    assert conv.weight.std().item() == pytest.approx((2 / (4 * 9)) ** 0.5, rel=0.15)
    # torch's default: uniform, std 1 / sqrt(3 * fan_in), fan_in = 8 * 9
    assert default.network.decoders[0].conv.body[0].weight.std().item() == pytest.approx(
        (1 / (3 * 8 * 9)) ** 0.5, rel=0.15)
    again = new_model(2, "foreground", base_channels=4, depth=2, architecture="resunet")
    assert all(torch.equal(a, b) for a, b in zip(kaiming.network.parameters(), again.network.parameters()))


def test_new_model_dialog_offers_every_architecture(qtbot):
    pytest.importorskip("qtpy")
    from napari_unet._widgets._new_model import ARCHITECTURE_CHOICES, NewModelDialog

    assert sorted(ARCHITECTURE_CHOICES.values()) == sorted(ARCHITECTURES)
    dialog = NewModelDialog(None)
    qtbot.addWidget(dialog)
    assert dialog.spec().architecture == "unet"
    dialog.architecture_combo.setCurrentText("UNet++")
    assert dialog.spec().architecture == "unetpp"
