"""The hub probe: an unreachable hub, a gated or unauthorised model, or one that does not answer is one line naming
the cause and the fix, at once; a model in the local cache still loads with the hub unreachable."""

import re
import threading

import httpx2
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
)

from medembed.encoders import EncoderError, _hub, get_encoder
from medembed.encoders._hub import HFCheckpoint, describe_hub_error, hub_problem
from tests.encoders.conftest import CACHED_COMMIT as COMMIT

CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once


@pytest.fixture
def unreachable_hub(monkeypatch):
    """The hub endpoint moved to a closed local port, offline flags unset, no probe remembered."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", CLOSED)
    # hf_hub_url formats this template (read from HF_ENDPOINT at import), not ENDPOINT
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", CLOSED + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(_hub, "_HUB_PROBES", {})


def test_unreachable_hub_without_a_cached_copy_names_the_cause_and_the_fix(unreachable_hub, tmp_path):
    with pytest.raises(EncoderError) as caught:
        get_encoder("medsiglip", cache_dir=str(tmp_path))
    message = str(caught.value)
    assert message.startswith(f"google/medsiglip-448: cannot reach the Hugging Face hub ({CLOSED}: ")
    assert "config.json is not in the local Hugging Face cache" in message
    assert "hf download google/medsiglip-448 --local-dir DIR" in message and "--model DIR" in message
    assert "-e efficientnet-lite0" in message and "\n" not in message


def test_a_cached_model_loads_with_the_hub_unreachable(unreachable_hub, hub_cache, tiny_siglip, pixels):
    encoder = get_encoder("medsiglip", model_id="acme/tiny-siglip", cache_dir=str(hub_cache))
    assert encoder.revision == COMMIT and encoder.checkpoint.offline  # the rest is read from the cache alone
    encoder.load(torch.device("cpu"))
    with torch.inference_mode():
        expected = tiny_siglip[1](pixel_values=pixels).pooler_output
        torch.testing.assert_close(encoder.embed(pixels), expected, rtol=1e-5, atol=1e-6)


def test_the_hub_is_probed_once_per_model(unreachable_hub, monkeypatch):
    calls = []
    monkeypatch.setattr(_hub, "_probe_hub", lambda model_id, revision: calls.append(model_id) or "down")
    assert hub_problem("acme/a") == hub_problem("acme/a") == "down"
    hub_problem("acme/b")
    assert calls == ["acme/a", "acme/b"]


def test_a_hub_that_does_not_answer_is_given_up_on_after_the_timeout(unreachable_hub, monkeypatch, tmp_path):
    """A network that drops packets (DNS included) hangs a request: the probe stops waiting after its timeout."""
    release = threading.Event()
    monkeypatch.setattr(_hub, "get_hf_file_metadata", lambda *args, **kwargs: release.wait(30))
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "0.1")
    try:
        with pytest.raises(EncoderError, match=r"did not answer within 0\.1 s \(a slow link: set HF_HUB_ETAG_TIMEOUT=30\)"):
            HFCheckpoint("acme/silent", cache_dir=str(tmp_path)).file("config.json")
    finally:
        release.set()


def _http_error(kind: type, status: int, message: str = "refused") -> Exception:
    request = httpx2.Request("HEAD", f"{CLOSED}/acme/m/resolve/main/config.json")
    return kind(message, response=httpx2.Response(status, request=request))


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (_http_error(GatedRepoError, 403), "the model is gated: accept its terms at .*/acme/m with your account, then log in here \\(hf auth login, or set HF_TOKEN\\)"),
        (_http_error(RepositoryNotFoundError, 401), "no such model, or it is private and needs a token with access"),
        (_http_error(HfHubHTTPError, 401), "refused access \\(HTTP 401\\): log in with a token"),
        (_http_error(HfHubHTTPError, 503), "answered HTTP 503"),
        (httpx2.ConnectError("[Errno 111] Connection refused\nmore"), "cannot reach the Hugging Face hub \\(.*: \\[Errno 111\\] Connection refused more\\)"),
    ],
)
def test_hub_errors_are_described_in_one_line(error, expected):
    described = describe_hub_error(error, "acme/m")
    assert "\n" not in described
    assert re.search(expected, described), described


def test_a_gated_model_fails_through_get_encoder_with_the_login_fix(unreachable_hub, monkeypatch, tmp_path):
    def gated(*args, **kwargs):
        raise _http_error(GatedRepoError, 403)

    monkeypatch.setattr(_hub, "get_hf_file_metadata", gated)
    with pytest.raises(EncoderError, match=r"^google/medgemma-4b-it: the model is gated: .*hf auth login.*-e efficientnet-lite0"):
        get_encoder("medgemma", cache_dir=str(tmp_path))
