"""Level specs: parsing, canonical names, the --tokens shorthand, and how a feature map becomes tokens."""

import pytest
import torch

from medembed.encoders.levels import (
    LevelError,
    LevelSpec,
    canonical_levels,
    parse_level,
    requested_levels,
    token_count,
    tokens_from_map,
)


@pytest.mark.parametrize(
    ("text", "spec", "canonical"),
    [
        ("block14", LevelSpec("block", 14), "block14"),
        ("block10@7x7", LevelSpec("block", 10, (7, 7)), "block10@7x7"),
        ("layer:-4@4x4", LevelSpec("layer", -4, (4, 4)), "layer-4@4x4"),
        (" Final@2x2 ", LevelSpec("final", None, (2, 2)), "final@2x2"),
        ("stem", LevelSpec("stem"), "stem"),
    ],
)
def test_parse_and_canonical(text, spec, canonical):
    assert parse_level(text) == spec
    assert spec.canonical() == canonical


@pytest.mark.parametrize("text", ["", "14", "block14@7", "block14@0x2", "block14@65x65", "block 14", "final@2x2x2"])
def test_bad_specs_are_one_clear_error(text):
    with pytest.raises(LevelError, match="level|grid"):
        parse_level(text)


def test_tokens_shorthand_is_the_final_level_and_duplicates_drop():
    specs = requested_levels("block14,final@2x2", "2x2,4x4")
    assert canonical_levels(specs) == "block14,final@2x2,final@4x4"
    with pytest.raises(LevelError, match="RxC"):
        requested_levels(None, "2by2")
    assert canonical_levels(requested_levels(None, None)) == ""


def test_tokens_from_map_put_the_global_average_first_then_the_grid_row_major():
    feature_map = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    tokens = tokens_from_map(feature_map, (2, 2))
    assert tokens.shape == (2, 1 + 4, 3) and token_count((4, 4), (2, 2)) == 5
    torch.testing.assert_close(tokens[:, 0], feature_map.mean(dim=(2, 3)))
    torch.testing.assert_close(tokens[:, 2], feature_map[:, :, :2, 2:].mean(dim=(2, 3)))  # top-right cell
    native = tokens_from_map(feature_map, None)
    assert native.shape == (2, 17, 3) and token_count((4, 4), None) == 17
    torch.testing.assert_close(native[:, 1 + 4 * 1 + 2], feature_map[:, :, 1, 2])
