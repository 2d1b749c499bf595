import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_unet.tiling import count_tiles, plan_tiles


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
    assert len(tiles) == count_tiles(shape, tile, halo, divisor)
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
