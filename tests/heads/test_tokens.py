"""Token heads on `[N, T, C]` levels: a planted local signal the pooled vector cannot separate, save/load,
determinism, clear errors; the adapter fine-tunes EfficientNet-Lite0's last stage from its cached input."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from medembed.errors import MedembedError
from medembed.scorers.heads import HeadLoadError, load_head, make_head

SMALL = dict(hidden=32, attention=16, dropout=0.0, lr=5e-3, max_epochs=12, patience=4, batch_size=32, n_jobs=1)


def planted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens [n, 1 + 16, 8]: abnormal rows carry a marker (+4 on channel 0) in one random cell, normal rows the
    same amount spread over all 16 cells, so the global token (token 0, the mean) is identical in law."""
    rng = np.random.default_rng(seed)
    cells = rng.normal(size=(n, 16, 8)).astype(np.float32)
    y = rng.integers(0, 2, n)
    where = rng.integers(0, 16, n)
    cells[y == 1, where[y == 1], 0] += 4.0
    cells[y == 0, :, 0] += 4.0 / 16
    return np.concatenate([cells.mean(axis=1, keepdims=True), cells], axis=1), y


@pytest.fixture(scope="module")
def data():
    return planted(400, 1), planted(200, 2), planted(300, 3)


@pytest.fixture(scope="module")
def attention(data):
    (X, y), (X_val, y_val), _ = data
    return make_head("attention", seed=0, **SMALL).fit(X, y, eval_set=[(X_val, y_val)])


def test_attention_head_finds_a_local_marker_the_pooled_vector_cannot(data, attention):
    (X, y), (X_val, y_val), (X_test, y_test) = data
    token_auroc = roc_auc_score(y_test, attention.predict_proba(X_test)[:, 1])
    pooled = make_head("logreg").fit(X[:, 0], y, eval_set=[(X_val[:, 0], y_val)])
    pooled_auroc = roc_auc_score(y_test, pooled.predict_proba(X_test[:, 0])[:, 1])
    assert token_auroc > 0.8 and pooled_auroc < 0.65, (token_auroc, pooled_auroc)
    weights = attention.attention_weights(X_test[y_test == 1])
    marker = np.argmax(X_test[y_test == 1, 1:, 0], axis=1)
    assert np.mean(np.argmax(weights, axis=1) == marker) > 0.5, "it attends to the marked cell"


def test_attention_head_is_deterministic_and_round_trips(tmp_path, data, attention):
    (X, y), (X_val, y_val), (X_test, _) = data
    again = make_head("attention", seed=0, **SMALL).fit(X, y, eval_set=[(X_val, y_val)])
    np.testing.assert_array_equal(again.predict_proba(X_test), attention.predict_proba(X_test))
    attention.save(tmp_path / "head")
    assert sorted(p.name for p in (tmp_path / "head").iterdir()) == ["attention.safetensors", "head.json"]
    np.testing.assert_array_equal(load_head(tmp_path / "head").predict_proba(X_test), attention.predict_proba(X_test))
    (tmp_path / "head" / "attention.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(HeadLoadError, match="safetensors"):
        load_head(tmp_path / "head")


def test_token_heads_refuse_pooled_arrays_and_mismatched_channels(data, attention):
    (X, y), _, _ = data
    with pytest.raises(MedembedError, match=r"\[N, T, C\] token array"):
        make_head("attention", **SMALL).fit(X[:, 0], y)
    with pytest.raises(MedembedError, match="channels"):
        attention.predict_proba(X[:, :, :4])
    bad = X.copy()
    bad[3, 2, 1] = np.nan
    with pytest.raises(MedembedError, match="row indices: 3"):
        attention.predict_proba(bad)


def test_concat_head_is_logreg_over_every_token(tmp_path, data):
    (X, y), (X_val, y_val), (X_test, y_test) = data
    head = make_head("concat").fit(X, y, eval_set=[(X_val, y_val)])
    assert head.n_features_in_ == 17 * 8
    head.save(tmp_path / "concat")
    np.testing.assert_array_equal(load_head(tmp_path / "concat").predict_proba(X_test), head.predict_proba(X_test))


def test_adapter_fine_tunes_the_last_stage_from_cached_block14_tokens(tmp_path):
    from medembed.encoders import get_encoder

    options = {"size": 64, "levels": "block14"}
    encoder = get_encoder("efficientnet-lite0", **options)
    encoder.load(torch.device("cpu"))
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.uniform(-1, 1, size=(48, 3, 64, 64)).astype(np.float32))
    y = np.arange(48) % 2
    pixels[y == 1, :, :32, :32] += 1.0  # abnormal images are brighter top-left
    with torch.inference_mode():
        _, tokens = encoder.embed_with_tokens(pixels)
    X = tokens["block14"].numpy().astype(np.float16)
    head = make_head("adapter", encoder="efficientnet-lite0", encoder_options=options, level="block14", max_epochs=2, batch_size=16, n_jobs=1)
    head.fit(X[:32], y[:32], eval_set=[(X[32:], y[32:])])
    assert len(head.selection_["val_auroc"]) == 2
    head.save(tmp_path / "adapter")
    restored = load_head(tmp_path / "adapter")
    np.testing.assert_allclose(restored.predict_proba(X[32:]), head.predict_proba(X[32:]), rtol=1e-6)
    with pytest.raises(MedembedError, match="square grid"):
        make_head("adapter", encoder="efficientnet-lite0", encoder_options=options, level="block14").fit(X[:32, :3], y[:32], eval_set=[(X[32:, :3], y[32:])])
    with pytest.raises(MedembedError, match="needs encoder= and level="):
        make_head("adapter", max_epochs=1).fit(X[:32], y[:32], eval_set=[(X[32:], y[32:])])
