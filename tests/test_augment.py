"""Tests for :mod:`napari_unet.augment`: shapes, label integrity, determinism, anisotropy."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unet.augment import AugmentSettings, augment

GEOMETRY_ONLY = AugmentSettings(intensity_probability=0.0, noise_probability=0.0, elastic_probability=1.0)


@pytest.mark.parametrize("shape,anisotropic", [((32, 32), False), ((24, 40), False),
                                              ((8, 16, 16), False), ((16, 16, 16), False),
                                              ((6, 24, 24), True)])
def test_shapes_dtypes_and_integer_labels(shape, anisotropic):
    rng = np.random.default_rng(1)
    image = rng.random(shape, dtype=np.float32)
    labels = rng.integers(0, 7, size=shape).astype(np.uint16)
    target = np.stack([labels > 0, labels == 3]).astype(np.uint8)
    mask = rng.random(shape) > 0.5
    for seed in range(6):
        out, (lab, tgt, msk) = augment(image, [labels, target, mask], np.random.default_rng(seed),
                                       spatial_dims=len(shape), anisotropic=anisotropic)
        assert out.shape == shape and out.dtype == np.float32
        assert lab.shape == shape and lab.dtype == np.uint16
        assert tgt.shape == (2, *shape) and tgt.dtype == np.uint8
        assert msk.shape == shape and msk.dtype == bool
        assert set(np.unique(lab)) <= set(range(7))
        assert set(np.unique(tgt)) <= {0, 1}


def test_same_seed_same_result():
    image = np.random.default_rng(0).random((16, 16, 16), dtype=np.float32)
    labels = (image > 0.5).astype(np.uint8)
    a = augment(image, [labels], np.random.default_rng(5), spatial_dims=3)
    b = augment(image, [labels], np.random.default_rng(5), spatial_dims=3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1][0], b[1][0])


@pytest.mark.parametrize("dims", [2, 3])
def test_image_and_labels_move_together(dims):
    shape = (24, 24) if dims == 2 else (12, 24, 24)
    labels = np.random.default_rng(2).integers(0, 5, size=shape).astype(np.int32)
    no_elastic = AugmentSettings(intensity_probability=0.0, noise_probability=0.0, elastic_probability=0.0)
    for seed in range(8):
        image, (moved,) = augment(labels.astype(np.float32), [labels], np.random.default_rng(seed),
                                  spatial_dims=dims, settings=no_elastic)
        assert np.array_equal(image, moved.astype(np.float32))
    # elastic: linear for the image, nearest for labels; on a smooth image both agree closely
    smooth = np.add.outer(np.arange(24.0), np.arange(24.0)) if dims == 2 else \
        np.add.outer(np.arange(12.0), np.add.outer(np.arange(24.0), np.arange(24.0)))
    image, (moved,) = augment(smooth.astype(np.float32), [smooth.astype(np.int32)],
                              np.random.default_rng(3), spatial_dims=dims, settings=GEOMETRY_ONLY)
    assert np.abs(image - moved).max() <= dims + 0.01


def test_anisotropic_keeps_z_slices_apart():
    # every z slice constant: in-plane rotations, flips and an elastic field without z
    # displacement keep it so
    shape = (6, 20, 20)
    image = np.broadcast_to(np.arange(6, dtype=np.float32)[:, None, None], shape).copy()
    for seed in range(10):
        out, _ = augment(image, [], np.random.default_rng(seed), spatial_dims=3, anisotropic=True,
                         settings=GEOMETRY_ONLY)
        assert np.allclose(out, out[:, :1, :1], atol=1e-5)
        assert sorted(out[:, 0, 0].tolist()) == list(range(6))


def test_isotropic_3d_rotates_out_of_plane():
    image = np.broadcast_to(np.arange(8, dtype=np.float32)[:, None, None], (8, 8, 8)).copy()
    no_elastic = AugmentSettings(intensity_probability=0.0, noise_probability=0.0, elastic_probability=0.0)
    outs = [augment(image, [], np.random.default_rng(s), spatial_dims=3, settings=no_elastic)[0]
            for s in range(12)]
    assert any(not np.allclose(o, o[:, :1, :1]) for o in outs)


def test_intensity_changes_only_the_image():
    image = np.random.default_rng(0).random((16, 16), dtype=np.float32)
    settings = AugmentSettings(flips=False, rotations=False, elastic_probability=0.0,
                               intensity_probability=1.0, noise_probability=1.0)
    labels = np.arange(256).reshape(16, 16)
    out, (lab,) = augment(image, [labels], np.random.default_rng(0), spatial_dims=2, settings=settings)
    assert not np.allclose(out, image)
    assert np.array_equal(lab, labels)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        augment(np.zeros((8, 8)), [np.zeros((8, 9))], np.random.default_rng(0), spatial_dims=2)
