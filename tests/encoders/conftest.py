"""Tiny, randomly initialised checkpoints saved with save_pretrained (sharded safetensors) and loaded offline."""

import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=300)


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    """No test may reach the Hugging Face hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def single_thread(single_torch_thread):
    """Every encoder test on one intra-op thread (tests/conftest.py says why)."""


@pytest.fixture
def pixels() -> torch.Tensor:
    """A `[2, 3, 32, 32]` batch in the [-1, 1] range the SigLIP towers expect."""
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory) -> tuple[Path, SiglipVisionModel]:
    """A SiglipVisionModel (with pooling head) saved in 4+ shards, and the model itself as reference."""
    torch.manual_seed(0)
    model = SiglipVisionModel(SiglipVisionConfig(**TINY_VISION)).eval()
    directory = tmp_path_factory.mktemp("tiny_siglip")
    model.save_pretrained(directory, max_shard_size="20KB")
    assert (directory / "model.safetensors.index.json").is_file()
    return directory, model


@pytest.fixture(scope="session")
def tiny_siglip_full(tmp_path_factory) -> tuple[Path, SiglipModel]:
    """A full SiglipModel (text + vision towers) in one file, and the model itself."""
    torch.manual_seed(1)
    config = SiglipConfig(text_config={**TINY_TEXT, "bos_token_id": 1, "eos_token_id": 2}, vision_config=TINY_VISION)
    model = SiglipModel(config).eval()
    directory = tmp_path_factory.mktemp("tiny_siglip_full")
    model.save_pretrained(directory)
    return directory, model


@pytest.fixture
def build_tiny_gemma3():
    """A function saving a tiny Gemma3ForConditionalGeneration into a directory and returning the model."""
    return _build_tiny_gemma3


def _build_tiny_gemma3(directory: Path) -> Gemma3ForConditionalGeneration:
    """Save a tiny Gemma3ForConditionalGeneration (vision tower without head, as Gemma 3's) in small shards."""
    torch.manual_seed(2)
    config = Gemma3Config(
        text_config={**TINY_TEXT, "hidden_size": 48, "num_key_value_heads": 2, "head_dim": 12},
        vision_config={**TINY_VISION, "vision_use_head": False},
        mm_tokens_per_image=4,
    )
    model = Gemma3ForConditionalGeneration(config).eval()
    model.save_pretrained(directory, max_shard_size="20KB")
    return model


CACHED_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, tiny_siglip):
    """A Hugging Face cache holding `acme/tiny-siglip` at CACHED_COMMIT, laid out as huggingface_hub writes it."""
    repo = tmp_path / "models--acme--tiny-siglip"
    shutil.copytree(tiny_siglip[0], repo / "snapshots" / CACHED_COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(CACHED_COMMIT)
    return tmp_path
