"""Tests for :mod:`napari_unet.training.augment`: shapes, label integrity, determinism, anisotropy."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unet.training.augment import AugmentSettings, augment

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


def test_elastic_displacement_equals_a_cubic_zoom_of_the_control_points():
    from scipy import ndimage as ndi

    from napari_unet.training.augment import elastic_displacement
    for shape in [(24, 40), (128, 128), (7, 33, 50), (16, 64, 64)]:
        field = elastic_displacement(shape, np.random.default_rng(3), 24, 2.5)
        rng = np.random.default_rng(3)
        coarse = tuple(max(2, int(np.ceil(s / 24)) + 1) for s in shape)
        for axis in range(len(shape)):
            control = rng.normal(0.0, 2.5, size=coarse).astype(np.float32)
            dense = ndi.zoom(control, [s / c for s, c in zip(shape, coarse)], order=3, mode="nearest",
                             grid_mode=True)
            assert dense.shape == shape and field[axis].shape == shape
            np.testing.assert_allclose(field[axis], dense, atol=1e-4)
            assert field[axis].std() > 0.5
    flat_z = elastic_displacement((6, 24, 24), np.random.default_rng(0), 24, 2.5, fixed_z=True)
    assert not flat_z[0].any() and flat_z[1].any()


def _coordinate_arrays(shape):
    """Integer coordinate grids (one per axis) of ``shape``, stacked as a ``(ndim, *shape)``
    label-like array, and an image that is linear in the coordinates."""
    grid = np.indices(shape).astype(np.int32)
    weights = np.array([7.0, 3.0, 1.0][-len(shape):]).reshape((-1,) + (1,) * len(shape))
    return grid, (grid * weights).sum(axis=0).astype(np.float32), weights.ravel()


@pytest.mark.parametrize("shape,patch,anisotropic", [((60, 70), (24, 24), False),
                                                     ((20, 50, 50), (8, 16, 16), False),
                                                     ((20, 50, 50), (6, 16, 16), True)])
def test_augment_patch_keeps_image_labels_and_mask_aligned(shape, patch, anisotropic):
    from napari_unet.training.augment import augment_patch, elastic_margin
    grid, image, weights = _coordinate_arrays(shape)
    mask = (grid.sum(axis=0) % 3) == 0  # any function of the position
    settings = AugmentSettings(elastic_probability=0.5, intensity_probability=0.0, noise_probability=0.0)
    margin = elastic_margin(settings)
    start = tuple((s - p) // 2 for s, p in zip(shape, patch))
    before = (grid.copy(), image.copy(), mask.copy())
    read_outside = False
    for seed in range(16):
        out, (coords, moved_mask) = augment_patch(image, [grid, mask], start, patch,
                                                  np.random.default_rng(seed), spatial_dims=len(shape),
                                                  anisotropic=anisotropic, settings=settings)
        assert out.shape == patch and coords.shape == (len(shape), *patch) and moved_mask.shape == patch
        # every output voxel comes from one source voxel; the mask is that voxel's mask, and the
        # image there is the linear image at a point within half a voxel per axis of it
        assert np.array_equal(moved_mask, mask[tuple(coords)])
        expected = (coords * weights.reshape((-1,) + (1,) * len(shape))).sum(axis=0)
        assert np.abs(out - expected).max() <= 0.5 * weights.sum() + 1e-3
        for axis, (a, p) in enumerate(zip(start, patch)):
            lo, hi = coords[axis].min(), coords[axis].max()
            reach = 0 if anisotropic and axis == 0 else margin
            assert a - reach <= lo and hi < a + p + reach
            read_outside |= bool(lo < a or hi >= a + p)
        if anisotropic:  # each z slice of the patch comes from one source slice
            assert all(len(np.unique(coords[0][z])) == 1 for z in range(patch[0]))
        assert not np.shares_memory(out, image) and not np.shares_memory(coords, grid)
    assert read_outside  # the deformation brought in real content from around the patch
    assert all(np.array_equal(a, b) for a, b in zip(before, (grid, image, mask)))


def test_augment_patch_without_elastic_is_a_flip_or_rotation_of_the_region():
    from napari_unet.training.augment import augment_patch
    grid, image, _ = _coordinate_arrays((30, 40))
    settings = AugmentSettings(elastic_probability=0.0, intensity_probability=0.0, noise_probability=0.0)
    region = grid[:, 5:21, 10:26].reshape(2, -1)
    for seed in range(6):
        out, (coords,) = augment_patch(image, [grid], (5, 10), (16, 16), np.random.default_rng(seed),
                                       spatial_dims=2, settings=settings)
        assert sorted(map(tuple, coords.reshape(2, -1).T)) == sorted(map(tuple, region.T))
        assert np.array_equal(out, image[tuple(coords)])


def test_augment_patch_rejects_a_patch_outside_the_image():
    from napari_unet.training.augment import augment_patch
    with pytest.raises(ValueError, match="not inside"):
        augment_patch(np.zeros((20, 20)), [], (10, 0), (16, 16), np.random.default_rng(0), spatial_dims=2)


# -- the robust preset: zoom, z rescaling, blur, wider intensity changes ------------------------

ZOOM_ONLY = AugmentSettings(flips=False, rotations=False, elastic_probability=0.0,
                            intensity_probability=0.0, noise_probability=0.0, zoom_probability=1.0)


def test_default_settings_draw_no_zoom_and_the_default_preset_is_the_default():
    from napari_unet.training.augment import PRESETS, ROBUST, _zoom_factors
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert _zoom_factors(rng, AugmentSettings(), 3) is None
    assert rng.bit_generator.state == state  # fine-tuning runs draw the same numbers as before
    assert PRESETS["default"] == AugmentSettings() and PRESETS["robust"] is ROBUST
    assert ROBUST.gamma_range[0] <= 0.5 and ROBUST.gamma_range[1] >= 2.0
    from napari_unet.training.augment import preset_name
    assert preset_name(None) == "default" and preset_name(ROBUST) == "robust"
    assert preset_name(AugmentSettings(noise_sigma=0.2)) == "custom"
    intensity = PRESETS["robust-intensity"]
    assert intensity.gamma_range == ROBUST.gamma_range and intensity.noise_sigma == ROBUST.noise_sigma
    assert _zoom_factors(np.random.default_rng(0), intensity, 3) is None  # no geometry widening


@pytest.mark.parametrize("shape,patch,start", [((60, 70), (24, 24), (18, 23)),
                                               ((60, 70), (24, 24), (0, 46)),  # at a corner
                                               ((20, 50, 50), (8, 16, 16), (6, 17, 17))])
def test_zoom_moves_image_labels_and_mask_together(shape, patch, start):
    from napari_unet.training.augment import augment_patch
    grid, image, weights = _coordinate_arrays(shape)
    mask = (grid.sum(axis=0) % 3) == 0
    spans = []
    for seed in range(12):
        out, (coords, moved_mask) = augment_patch(image, [grid, mask], start, patch,
                                                  np.random.default_rng(seed), spatial_dims=len(shape),
                                                  settings=ZOOM_ONLY)
        assert out.shape == patch and out.dtype == np.float32 and coords.dtype == np.int32
        assert np.array_equal(moved_mask, mask[tuple(coords)])
        expected = (coords * weights.reshape((-1,) + (1,) * len(shape))).sum(axis=0)
        assert np.abs(out - expected).max() <= 0.5 * weights.sum() + 1e-3
        for axis, n in enumerate(shape):
            assert 0 <= coords[axis].min() and coords[axis].max() < n  # mirrored into the image
        # the same zoom on every axis: the patch covers patch / factor source voxels
        last = coords[-1][(0,) * (len(shape) - 1)]
        spans.append(abs(int(last[-1]) - int(last[0])) + 1)
    if start[-1] + patch[-1] < shape[-1]:  # not folded back at the image's edge
        assert min(spans) < patch[-1] * 0.85 and max(spans) > patch[-1] * 1.2  # in and out
        assert max(spans) <= patch[-1] / 0.6 + 2


def test_anisotropy_rescales_z_alone():
    from napari_unet.training.augment import augment_patch
    shape, patch, start = (40, 30, 30), (8, 16, 16), (16, 7, 7)
    grid, image, _ = _coordinate_arrays(shape)
    settings = AugmentSettings(flips=False, rotations=False, elastic_probability=0.0,
                               intensity_probability=0.0, noise_probability=0.0,
                               anisotropy_probability=1.0, anisotropy_range=(0.5, 2.0))
    z_spans = set()
    for seed in range(10):
        _, (coords,) = augment_patch(image, [grid], start, patch, np.random.default_rng(seed),
                                     spatial_dims=3, anisotropic=True, settings=settings)
        # y and x are the patch's own; every z plane of the output is one source plane
        assert np.array_equal(coords[1], grid[1][start[0]:start[0] + 8, 7:23, 7:23])
        assert np.array_equal(coords[2], grid[2][start[0]:start[0] + 8, 7:23, 7:23])
        assert all(len(np.unique(coords[0][z])) == 1 for z in range(patch[0]))
        z_spans.add(int(coords[0].max() - coords[0].min()) + 1)
    assert min(z_spans) < 8 < max(z_spans)
    # 2D patches have no z to rescale
    out, (coords,) = augment_patch(image[0], [grid[1:, 0]], (7, 7), (16, 16), np.random.default_rng(0),
                                   spatial_dims=2, settings=settings)
    assert np.array_equal(coords, grid[1:, 0, 7:23, 7:23])


def test_blur_smooths_the_image_and_stays_in_plane_for_anisotropic_stacks():
    settings = AugmentSettings(flips=False, rotations=False, elastic_probability=0.0,
                               intensity_probability=0.0, noise_probability=0.0, blur_probability=1.0)
    rng = np.random.default_rng(0)
    noise = rng.random((6, 24, 24), dtype=np.float32)
    labels = (noise > 0.5).astype(np.uint8)
    out, (lab,) = augment(noise, [labels], np.random.default_rng(1), spatial_dims=3, settings=settings)
    assert out.std() < 0.6 * noise.std() and np.array_equal(lab, labels)
    planes = np.broadcast_to(np.arange(6, dtype=np.float32)[:, None, None], (6, 24, 24)).copy()
    out, _ = augment(planes, [], np.random.default_rng(1), spatial_dims=3, anisotropic=True,
                     settings=settings)
    np.testing.assert_allclose(out, planes, atol=1e-5)  # no mixing of z slices


def test_robust_preset_is_deterministic_and_keeps_labels_integer():
    from napari_unet.training.augment import ROBUST, augment_patch
    rng = np.random.default_rng(0)
    image = rng.random((20, 40, 40), dtype=np.float32)
    labels = rng.integers(0, 9, size=image.shape).astype(np.uint16)
    for seed in range(8):
        a = augment_patch(image, [labels], (4, 5, 6), (8, 24, 24), np.random.default_rng(seed),
                          spatial_dims=3, anisotropic=seed % 2 == 0, settings=ROBUST)
        b = augment_patch(image, [labels], (4, 5, 6), (8, 24, 24), np.random.default_rng(seed),
                          spatial_dims=3, anisotropic=seed % 2 == 0, settings=ROBUST)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1][0], b[1][0])
        assert a[0].shape == (8, 24, 24) and a[1][0].dtype == np.uint16
        assert set(np.unique(a[1][0])) <= set(range(9))


def test_robust_preset_covers_a_wider_intensity_range_than_the_default():
    from napari_unet.training.augment import ROBUST
    # a background (0.1) with a few darker pixels and a bright square (0.9), as after percentile
    # normalisation: the background level after augmentation
    image = np.full((32, 32), 0.1, np.float32)
    image[0, :4] = 0.0
    image[8:24, 8:24] = 0.9
    geometry_off = dict(flips=False, rotations=False, elastic_probability=0.0)

    def background_levels(settings):
        return np.array([np.median(augment(image, [], np.random.default_rng(s), spatial_dims=2,
                                           settings=settings)[0][:4]) for s in range(300)])

    default = background_levels(AugmentSettings(**geometry_off))
    robust = background_levels(AugmentSettings(**{**ROBUST.__dict__, **geometry_off,
                                                   "zoom_probability": 0.0, "blur_probability": 0.0}))
    assert robust.max() > default.max() + 0.1  # e.g. gamma 0.5 lifts the background
    assert np.percentile(robust, 95) > max(0.35, np.percentile(default, 95) + 0.05)
