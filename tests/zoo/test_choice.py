"""The first model offered for an image: dims, channels, kind of data, the last one used."""

import pytest

from napari_unet.zoo import choice
from napari_unet.zoo.choice import DataTraits, ModelTraits, choose_model, data_kind

SHIPPED = [ModelTraits("cells-3d", 3, 1, "membranes"), ModelTraits("em-membranes-2d", 2, 1, "em"),
           ModelTraits("nuclei-2d", 2, 1, "nuclei"), ModelTraits("nuclei-3d", 3, 1, "nuclei")]


@pytest.mark.parametrize("sample, ndim, expected", [
    ("em_2d", 2, "em-membranes-2d"), ("nuclei_2d", 2, "nuclei-2d"), ("nuclei_3d", 3, "nuclei-3d"),
    ("cells_3d", 3, "cells-3d")])
def test_each_microscopy_sample_gets_the_model_made_for_it(sample, ndim, expected):
    data = DataTraits(ndim, 1, data_kind(sample))
    # whatever was selected before (cells-3d, the first in the list, was the old default)
    for current in (None, "cells-3d", "nuclei-2d"):
        assert choose_model(data, SHIPPED, current=current).key == expected


def test_ct_gets_no_microscopy_model_and_says_why():
    got = choose_model(DataTraits(3, 1, data_kind("ct_small")), SHIPPED, current="cells-3d")
    assert got.key is None and "CT" in got.reason and "Load" in got.reason
    # a stack in mm is a medical scan too
    assert data_kind(None, "mm") == "ct" and data_kind(None, "um") is None


def test_the_model_used_last_for_similar_data_wins_over_the_kind():
    data = DataTraits(3, 1, "nuclei")
    assert choose_model(data, SHIPPED, remembered="cells-3d").key == "cells-3d"
    # a remembered model that no longer fits (2D-only image) is ignored
    assert choose_model(DataTraits(2, 1, "nuclei"), SHIPPED, remembered="nuclei-3d").key == "nuclei-2d"


def test_dims_and_channels_rule_out_models():
    models = [*SHIPPED, ModelTraits("rgb-2d", 2, 3, None)]
    assert choose_model(DataTraits(2, 3), models).key == "rgb-2d"
    assert choose_model(DataTraits(2, 1), models, current="nuclei-3d").key in ("em-membranes-2d",
                                                                               "nuclei-2d")
    # an image of unknown kind keeps the user's model while it fits, a 2D one on a stack too
    assert choose_model(DataTraits(3, 1), models, current="nuclei-2d").key == "nuclei-2d"
    assert choose_model(DataTraits(3, 1), models).key == "cells-3d"
    assert choose_model(DataTraits(2, 4), models).key is None


def test_remembered_choices_persist_for_shipped_models_only(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_UNET_CONFIG_DIR", str(tmp_path))
    choice.forget_session()
    data = DataTraits(3, 1, "nuclei")
    assert choice.remembered_choice(data) is None
    choice.remember_choice(data, "cells-3d")
    choice.remember_choice(DataTraits(2, 1, None), "tuned (fine-tuned)", persistent=False)
    choice.forget_session()  # a new session
    assert choice.remembered_choice(data) == "cells-3d"
    assert choice.remembered_choice(DataTraits(2, 1, None)) is None


def test_model_traits_of_the_registry_cover_the_shipped_models():
    from napari_unet.zoo.registry import ModelRegistry

    traits = {t.key: t for t in choice.model_traits(ModelRegistry())}
    assert set(choice.MODEL_KINDS) <= set(traits)
    assert traits["nuclei-3d"].spatial_dims == 3 and traits["em-membranes-2d"].spatial_dims == 2
