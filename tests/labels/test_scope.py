"""Edit scopes: the region an edit works on, seeds in it, typed ids, the whole-stack job."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unet.labels import edits
from napari_unet.labels.scope import (
    EditScope,
    chosen_ids,
    edit_scope,
    labels_under_seeds,
    offset_new_ids,
    parse_ids,
    result_in_dtype,
    run_on_scope,
    scope_spacing,
    seed_index,
    seeds_in_scope,
    seeds_in_slice,
    seeds_on_label,
    slice_id_offset,
    split_target,
    whole_scope,
    whole_stack_job,
)
from napari_unet.progress import drain


def test_parse_ids():
    assert parse_ids("3, 7 12") == [3, 7, 12]
    assert parse_ids(" 4;5 ") == [4, 5]
    assert parse_ids("") == []
    with pytest.raises(ValueError, match="whole numbers"):
        parse_ids("one, two")
    with pytest.raises(ValueError, match="positive"):
        parse_ids("-1")


def test_chosen_ids_and_split_target_order_of_preference():
    assert chosen_ids(" 1 2 ", [5], 9) == [1, 2]
    assert chosen_ids("", [5, 6], 9) == [5, 6]
    assert chosen_ids("  ", [], 9) == [9]
    assert split_target("7, 8", [(1.0, 1.0)], [3], 9) == 7
    assert split_target("", [(1.0, 1.0)], [3], 9) == 3
    assert split_target("", [], [], 9) == 9
    with pytest.raises(IndexError):
        split_target("", [(1.0, 1.0)], [], 9)  # seeds, but not on a label
    with pytest.raises(IndexError):
        split_target(",", [], [], 9)
    with pytest.raises(ValueError):
        split_target("x", [], [], 9)


def test_scopes():
    scope = edit_scope((6, 10, 12), 2)  # z: the third axis from the end
    assert scope == EditScope((slice(2, 3), slice(0, 10), slice(0, 12)), 2)
    assert scope.is_slice and scope.where(3) == "slice 2"
    channels = edit_scope((2, 6, 10, 12), 4)
    assert channels.region == (slice(0, 2), slice(4, 5), slice(0, 10), slice(0, 12))
    whole = edit_scope((6, 10, 12), None)
    assert whole == whole_scope((6, 10, 12)) and whole.z is None
    assert whole.where(3) == "whole stack"
    flat = edit_scope((10, 12), 3)  # 2D: always the whole image
    assert flat.z is None and flat.where(2) == "image"


def test_seeds_in_scope_and_labels_under_them():
    data = np.zeros((4, 10, 10), np.uint16)
    data[1, 2:5, 2:5] = 3
    data[1, 6:9, 6:9] = 5
    data[2, 2:5, 2:5] = 7
    points = [(1.2, 3.0, 3.0), (1.0, 7.4, 7.0), (2.0, 3.0, 3.0), (1.0, 20.0, 3.0), (1, 0, 0)]
    on_slice = seeds_in_scope(points, data.shape, 1)
    assert on_slice == [(0.0, 3.0, 3.0), (0.0, 7.4, 7.0), (0.0, 0.0, 0.0)]  # z set to 0
    assert labels_under_seeds(data, on_slice, 1) == [3, 5]
    everywhere = seeds_in_scope(points, data.shape, None)
    assert len(everywhere) == 4  # the one outside the array is left out
    assert labels_under_seeds(data, everywhere, None) == [3, 5, 7]
    # points with more coordinates than the labels (a time axis): the last ones count
    assert seeds_in_scope([(9.0, 1.0, 3.0, 3.0)], data.shape, None) == [(1.0, 3.0, 3.0)]


def test_seeds_in_the_edited_block():
    data = np.zeros((4, 10, 10), np.uint16)
    data[1, 2:5, 2:5] = 3
    seeds = [(0.0, 3.0, 3.0), (0.0, 8.0, 8.0)]
    local = seeds_in_slice(seeds, 1)
    assert local == [(3.0, 3.0), (8.0, 8.0)]
    assert seed_index(local[0], 1) == (1, 3, 3)
    assert seeds_on_label(data, local, 1, 3) == [(3.0, 3.0)]
    assert seeds_on_label(data, local, 1, 9) is None
    assert seeds_in_slice([(1.0, 3.0, 3.0)], None) == [(1.0, 3.0, 3.0)]
    assert seed_index((1.4, 3.0, 3.0), None) == (1, 3, 3)


def test_scope_spacing():
    assert scope_spacing((2.0, 0.5, 0.25), 3, None) == (2.0, 0.5, 0.25)
    assert scope_spacing((2.0, 0.5, 0.25), 3, 4) == (0.5, 0.25)
    assert scope_spacing((9.0, 2.0, 0.5, 0.25), 3, None) == (2.0, 0.5, 0.25)


def test_run_on_scope_gives_a_slice_as_2d():
    stack = np.zeros((3, 6, 6), np.uint16)
    stack[1, 1:3, 1:3] = 4
    seen = []

    def operation(block):
        seen.append(block.shape)
        return block * 2

    out = run_on_scope(stack[1:2], 1, operation)
    assert seen == [(6, 6)] and out.shape == (1, 6, 6) and out.max() == 8
    out = run_on_scope(stack, None, operation)
    assert seen[-1] == (3, 6, 6) and out.shape == stack.shape


def test_new_ids_of_a_slice_follow_the_others():
    stack = np.zeros((3, 6, 6), np.uint8)
    stack[0, 0, 0] = 4
    stack[2, 0, 0] = 250
    stack[1, 2:4, 2:4] = 1
    assert slice_id_offset(stack, 1) == 250
    block = edits.binary_to_instances(stack[1] > 0)
    out = offset_new_ids(block, 250, stack.dtype)
    assert int(out.max()) == 251 and out.dtype == np.promote_types(block.dtype, np.uint8)
    assert out[0, 0] == 0  # background stays 0


def test_result_in_dtype():
    small = np.array([0, 3, 7], np.int64)
    assert result_in_dtype(small, np.dtype(np.uint8)).dtype == np.uint8
    big = np.array([0, 300], np.int64)
    assert result_in_dtype(big, np.dtype(np.uint8)).dtype == np.promote_types(np.uint8, np.int64)
    mask = np.array([True, False])
    assert result_in_dtype(mask, np.dtype(np.uint16)).dtype == np.uint16
    same = np.array([1, 2], np.uint16)
    assert result_in_dtype(same, np.dtype(np.uint16)) is same


def test_whole_stack_job_stages_and_results():
    data = np.zeros((3, 8, 8), np.uint16)
    data[:, 2:6, 2:6] = 5
    stages = []
    out = drain(whole_stack_job(data, lambda a: np.where(a == 5, 2, a), "Relabel"), stages.append)
    assert stages == ["computing", "comparing"]
    assert out.dtype == np.uint16 and (out[data == 5] == 2).all()
    assert drain(whole_stack_job(data, lambda a: a.copy(), "Nothing")) is None
    with pytest.raises(ValueError, match="shape"):
        drain(whole_stack_job(data, lambda a: a[0], "Bad"))
