"""Every encoder's levels: shapes known before loading match the forward, the pooled vector is unchanged by asking
for levels, negative indices and bad names resolve or fail clearly, views average deterministic extra views."""

import pytest
import torch

from medembed.encoders import get_encoder
from medembed.encoders.views import ViewError, apply_view
from medembed.encoders.levels import LevelError


@pytest.fixture(scope="module")
def lite0():
    encoder = get_encoder("efficientnet-lite0", size=64, levels="block14,block10@2x2,block:-1", tokens="1x1")
    encoder.load(torch.device("cpu"))
    return encoder


def test_efficientnet_levels_match_the_forward_and_keep_the_pooled_vector(lite0):
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        pooled, tokens = lite0.embed_with_tokens(pixels)
        torch.testing.assert_close(pooled, lite0.embed(pixels))
    assert [spec.canonical() for spec in lite0.levels] == ["block14", "block10@2x2", "block15", "final@1x1"]
    assert {level: tuple(grid.shape[1:]) for level, grid in tokens.items()} == lite0.token_shapes()
    assert lite0.token_shapes() == {"block14": (5, 192), "block10@2x2": (5, 112), "block15": (5, 320), "final@1x1": (2, 1280)}
    torch.testing.assert_close(tokens["final@1x1"][:, 0], pooled)  # token 0 is the global average
    torch.testing.assert_close(tokens["final@1x1"][:, 1], pooled)
    assert lite0.fingerprint()["levels"] == "block14,block10@2x2,block15,final@1x1"


def test_adapter_tail_reproduces_the_pooled_embedding_from_the_cached_level(lite0):
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        pooled, maps = lite0.level_maps(pixels, {"block14"})
        torch.testing.assert_close(lite0.tail("block14").eval()(maps["block14"].contiguous()), pooled, rtol=1e-4, atol=1e-4)
    assert all(p.requires_grad for p in lite0.tail("block14").parameters())
    assert not any(p.requires_grad for p in lite0.network.parameters()), "the encoder stays frozen"


@pytest.mark.parametrize(
    ("levels", "message"),
    [("block99", "no level 'block99'.*block0..block15"), ("block:-40", "out of range"), ("block14@8x8", "finer grid"), ("layer3", "no level")],
)
def test_bad_levels_name_what_exists(levels, message):
    with pytest.raises(LevelError, match=message):
        get_encoder("efficientnet-lite0", size=224, levels=levels)


def test_levels_change_the_fingerprint_and_views_change_the_embedding_kind():
    plain = get_encoder("efficientnet-lite0").fingerprint()
    assert get_encoder("efficientnet-lite0", levels="block14").fingerprint()["levels"] != plain["levels"]
    viewed = get_encoder("efficientnet-lite0", views="hflip,zoom:0.875", view_reduce="all")
    assert viewed.fingerprint()["embedding_kind"] == "global_avg_pool+mean(hflip,zoom0.875)"
    assert viewed.fingerprint()["levels"] == "views" and viewed.token_shapes() == {"views": (4, 1280)}
    with pytest.raises(ViewError, match="hflip, vflip or zoom"):
        get_encoder("efficientnet-lite0", views="rotate")


def test_views_average_the_original_and_its_flip(lite0):
    encoder = get_encoder("efficientnet-lite0", size=64, views="hflip", view_reduce="all")
    encoder.load(torch.device("cpu"))
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        pooled, tokens = encoder.embed_with_tokens(pixels)
        original, flipped = encoder.embed(pixels), encoder.embed(pixels.flip(-1))
    torch.testing.assert_close(pooled, (original + flipped) / 2)
    torch.testing.assert_close(tokens["views"][:, 1], original)
    torch.testing.assert_close(tokens["views"][:, 2], flipped)
    zoomed = apply_view(pixels, "zoom0.5")
    assert zoomed.shape == pixels.shape


def test_vit_levels_are_hidden_states_as_patch_grids(tiny_siglip, pixels):
    encoder = get_encoder("medsiglip", model_id=str(tiny_siglip[0]), levels="layer:-1,layer0@2x2,final")
    assert [spec.canonical() for spec in encoder.levels] == ["layer2", "layer0@2x2", "final"]
    encoder.load(torch.device("cpu"))
    with torch.inference_mode():
        pooled, tokens = encoder.embed_with_tokens(pixels)
        hidden = tiny_siglip[1](pixel_values=pixels, output_hidden_states=True)
    torch.testing.assert_close(pooled, hidden.pooler_output)
    assert encoder.token_shapes() == {"layer2": (17, 32), "layer0@2x2": (5, 32), "final": (17, 32)}
    torch.testing.assert_close(tokens["layer2"][:, 1:], hidden.hidden_states[2])
    torch.testing.assert_close(tokens["final"][:, 0], hidden.last_hidden_state.mean(dim=1))
