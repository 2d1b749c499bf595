import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_unet.engine.tiling import plan_run, plan_tiles


@st.composite
def tiling_cases(draw):
    ndim = draw(st.integers(1, 3))
    divisor = tuple(draw(st.sampled_from([1, 2, 4, 8])) for _ in range(ndim))
    shape = tuple(draw(st.integers(1, 70)) for _ in range(ndim))
    halo = tuple(d * draw(st.integers(0, 3)) for d in divisor)
    tile = tuple(draw(st.integers(1, 90)) for _ in range(ndim))
    return shape, tile, halo, divisor


@settings(max_examples=150, deadline=None)
@given(tiling_cases())
def test_cores_cover_every_voxel_once(case):
    shape, tile, halo, divisor = case
    tiles = plan_tiles(shape, tile, halo, divisor)
    # the run plan the engine executes has exactly these tiles, in this order
    plan = plan_run(shape, halo, divisor, max_voxels=1, slicewise=False, has_channels=False,
                    tile_shape=tile)
    assert plan.n_tiles == len(tiles) and plan.tiles() == tiles
    coverage = np.zeros(shape, dtype=np.int32)
    for t in tiles:
        coverage[t.write] += 1
        for read, write, pad, div, length in zip(t.read, t.write, halo, divisor, shape):
            assert read.start <= write.start and write.stop <= read.stop
            assert write.start % div == 0 and read.start % div == 0
            assert read.start == max(0, write.start - pad)
            assert read.stop == min(length, write.stop + pad)
        assert t.crop == tuple(slice(w.start - r.start, w.stop - r.start) for r, w in zip(t.read, t.write))
    assert (coverage == 1).all()


def test_tile_larger_than_image_is_one_tile_without_halo():
    (tile,) = plan_tiles((30, 40), (64, 64), (8, 8), (8, 8))
    assert tile.read == tile.write == (slice(0, 30), slice(0, 40))


def test_read_respects_tile_size():
    tiles = plan_tiles((200,), (96,), (16,), (8,))
    assert all(t.read_shape[0] <= 96 for t in tiles)
    assert [t.write for t in tiles][:2] == [(slice(0, 64),), (slice(64, 128),)]


def test_region_restricts_cores_but_not_halos():
    tiles = plan_tiles((100, 100), (40, 40), (8, 8), (8, 8), region=(slice(32, 64), slice(0, 100)))
    writes = np.zeros((100, 100), bool)
    for t in tiles:
        writes[t.write] = True
    assert writes[32:64].all() and not writes[:32].any() and not writes[64:].any()
    assert min(t.read[0].start for t in tiles) == 24


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of the divisor"):
        plan_tiles((10, 10), (8, 8), (3, 3), (2, 2))
    with pytest.raises(ValueError, match="differ in length"):
        plan_tiles((10, 10), (8,), (0, 0))
    with pytest.raises(ValueError, match="positive"):
        plan_tiles((10,), (0,), (0,))


# --- the halo-aware planner ------------------------------------------------------------------

import math  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from napari_unet.engine.tiling import axis_read_per_written, choose_cores  # noqa: E402


def _halving_cores(shape, halo, divisor, max_voxels):
    """The old rule: halve the longest axis until the tile fits (for comparison)."""
    tile = list(shape)
    while math.prod(tile) > max_voxels:
        axis = max(range(len(tile)), key=lambda a: tile[a] / divisor[a])
        if tile[axis] <= 2 * divisor[axis]:
            break
        tile[axis] = max(2 * divisor[axis], (tile[axis] // 2 + divisor[axis] - 1) // divisor[axis] * divisor[axis])
    return tuple(max(d, (t - 2 * h) // d * d) if t < n else n
                 for t, h, d, n in zip(tile, halo, divisor, shape))


def _ratio(shape, cores, halo):
    return math.prod(axis_read_per_written(n, c, h) for n, c, h in zip(shape, cores, halo))


@settings(max_examples=60, deadline=None)
@given(shape=st.tuples(st.integers(8, 400), st.integers(64, 4096), st.integers(64, 4096)),
       halo_steps=st.tuples(st.integers(1, 8), st.integers(1, 12), st.integers(1, 12)),
       budget=st.integers(2**16, 2**27))
def test_planner_fits_memory_and_beats_halving(shape, halo_steps, budget):
    divisor = (4, 8, 8)
    halo = tuple(s * d for s, d in zip(halo_steps, divisor))
    plan = plan_run(shape, halo, divisor, max_voxels=budget, slicewise=False, has_channels=False)
    smallest = math.prod(min(n, d + 2 * h) for n, d, h in zip(shape, divisor, halo))
    if smallest <= budget:
        assert math.prod(plan.tile_shape) <= budget
    assert all(c % d == 0 or c == n for c, d, n in zip(plan.core, divisor, shape))
    # the ratio it reports is what its tiles really compute (counted per axis, no arrays)
    read = math.prod(sum(min(n, (g + 1) * c + h) - max(0, g * c - h) for g in range(math.ceil(n / c)))
                     for n, c, h in zip(shape, plan.core, halo))
    assert math.isclose(plan.read_per_written, read / math.prod(shape), rel_tol=1e-9)
    old = _halving_cores(shape, halo, divisor, budget)
    old_tile = math.prod(min(n, c + 2 * h) if c < n else n for n, c, h in zip(shape, old, halo))
    if old_tile <= budget:
        assert plan.read_per_written <= _ratio(shape, old, halo) + 1e-9


def test_planner_on_a_big_volume_with_the_shipped_3d_halos():
    # nuclei-3d: halo (32, 64, 64), divisor (4, 8, 8); 44M voxels is about 3.5 GB in bf16
    plan = plan_run((200, 1024, 1024), (32, 64, 64), (4, 8, 8), max_voxels=44_000_000,
                    slicewise=False, has_channels=False)
    assert plan.read_per_written < 1.75 and plan.n_tiles <= 12
    # the old halving rule here: a thin core and ~94 computed voxels per voxel written
    old = _halving_cores((200, 1024, 1024), (32, 64, 64), (4, 8, 8), 6_000_000)
    assert _ratio((200, 1024, 1024), old, (32, 64, 64)) > 5


def test_explicit_tile_never_shrinks_the_core_silently():
    plan = plan_run((100, 100), (8, 8), (8, 8), max_voxels=10**9, slicewise=False,
                    has_channels=False, tile_shape=(40, 40))
    assert plan.core == (24, 24) and plan.tile_shape == (40, 40)
    assert "read/written" in plan.describe()


def test_plan_order_starts_at_the_given_point():
    plan = plan_run((64, 64), (8, 8), (8, 8), max_voxels=10**9, slicewise=False,
                    has_channels=False, tile_shape=(32, 32))
    order = plan.order((50, 5))
    first = plan.tile(order[0])
    assert first.write[0].start <= 50 < first.write[0].stop and first.write[1].start <= 5 < first.write[1].stop
    assert sorted(order) == list(range(plan.n_tiles))
    assert plan.order(None) == list(range(plan.n_tiles))


def test_plan_round_trips_through_plain_data():
    plan = plan_run((30, 64, 64), (0, 8, 8), (1, 8, 8), max_voxels=10**5, slicewise=True,
                    has_channels=False, max_slices=4)
    assert plan.core[0] <= 4
    assert type(plan).from_dict(plan.to_dict()) == plan
    assert choose_cores((10,), (0,), (1,), 100) == (10,)
