"""Looking encoders up by name, with clear errors for unknown names and options."""

import pytest

from medembed.encoders import Encoder, EncoderError, available_encoders, get_encoder
from medembed.errors import MedembedError


def test_available_encoders():
    assert available_encoders() == [
        "autoencoder", "efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "hf-vision", "medgemma", "medsiglip"
    ]


def test_get_encoder_builds_the_named_encoder_with_options():
    encoder = get_encoder("efficientnet-lite0", size=192)
    assert isinstance(encoder, Encoder)
    assert encoder.name == "efficientnet-lite0" and encoder.preprocess.size == 192


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(EncoderError, match="unknown encoder 'medsiglap'; available: autoencoder, efficientnet-lite0, efficientnet-lite1, efficientnet-lite2, hf-vision"):
        get_encoder("medsiglap")


def test_unknown_option_names_it_and_the_accepted_ones():
    with pytest.raises(MedembedError, match=r"unexpected keyword argument 'pooling'; its options: size"):
        get_encoder("efficientnet-lite0", pooling="cls")


@pytest.mark.parametrize("name", available_encoders())
def test_the_registry_describes_each_encoder_as_its_class_does(name):
    """`encoders list` reads the registry (no torch); what it says of the levels is what the class computes."""
    from medembed.encoders.registry import _REGISTRY

    assert _REGISTRY[name].levels == _REGISTRY[name].load().levels_help()
