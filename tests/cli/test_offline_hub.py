"""A hub encoder with no network, through the installed entry point as a new user runs it: `extract` and `encoders
check` with the default MedSigLIP fail at once (exit 2, one line naming the cause and the offline encoder, no
retries, no traceback), and a model already in the local Hugging Face cache still extracts.

The hub is a closed local port (HF_ENDPOINT=http://127.0.0.1:9: refused at once); the offline flags are unset so
that the hub is really asked, and HF_HOME is a fresh folder so that no real cache is read.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

MEDEMBED = shutil.which("medembed", path=str(Path(sys.executable).parent)) or shutil.which("medembed")
COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
# Well below huggingface_hub's own retries (5 of up to 8 s, then a 60 s timeout): reaching it means a retry loop.
NO_RETRIES_S = 30


def run_offline(*args: str, hf_home: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MEDEMBED_DEBUG", "HF_HUB_CACHE", "HF_TOKEN")}
    env |= {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(hf_home), "COLUMNS": "400"}
    return subprocess.run([MEDEMBED, *args], check=False, capture_output=True, text=True, cwd=cwd, env=env, timeout=NO_RETRIES_S)


@pytest.fixture
def images(tmp_path) -> Path:
    """Two small radiograph-like PNGs and their manifest, under tmp_path/data."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (40, 56), dtype=np.uint8)).save(data / f"{name}.png")
    (data / "m.csv").write_text("image_id,path,label,split\na,a.png,0,train\nb,b.png,1,test\n")
    return data


def assert_one_clear_line(result: subprocess.CompletedProcess, model: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {model}: cannot reach the Hugging Face hub (http://127.0.0.1:9: ")
    assert "is not in the local Hugging Face cache" in lines[0]
    assert f"hf download {model} --local-dir DIR" in lines[0] and "--model DIR" in lines[0]
    assert "-e efficientnet-lite0" in lines[0]
    assert "Retrying" not in result.stderr and "Traceback" not in result.stderr


def test_extract_with_the_default_encoder_and_no_network_fails_at_once(tmp_path, images):
    result = run_offline("extract", "m.csv", "--root", ".", "--encoder", "medsiglip", "--out", "s.h5", hf_home=tmp_path / "hf", cwd=images)
    assert_one_clear_line(result, "google/medsiglip-448")
    assert not (images / "s.h5").exists()


@pytest.mark.parametrize(("encoder", "model"), [("medsiglip", "google/medsiglip-448"), ("medgemma", "google/medgemma-4b-it")])
def test_encoders_check_with_no_network_fails_at_once(tmp_path, images, encoder, model):
    assert_one_clear_line(run_offline("encoders", "check", "-e", encoder, hf_home=tmp_path / "hf", cwd=images), model)


def test_a_model_in_the_local_cache_extracts_with_no_network(tmp_path, images):
    """A tiny SigLIP tower saved as huggingface_hub lays out its cache (snapshot + refs/main) under HF_HOME/hub."""
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-siglip"
    SiglipVisionModel(config).save_pretrained(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    result = run_offline(
        "extract", "m.csv", "--root", ".", "--encoder", "medsiglip", "--model", "acme/tiny-siglip", "--device", "cpu", "--out", "s.h5",
        hf_home=tmp_path / "hf", cwd=images,
    )
    assert result.returncode == 0, result.stderr
    assert "Retrying" not in result.stderr and "Traceback" not in result.stderr
    import h5py

    with h5py.File(images / "s.h5", "r") as store:
        assert store["embeddings"].shape == (2, 32)
