"""Zero-shot abnormality scores from a SigLIP-family model's text tower, calibrated on val like a fitted head.

The image side is an existing ``medsiglip`` embedding store (pooled vision output: SigLIP's image features before
normalisation); only the text tower, the tokenizer and the logit scale and bias are loaded here, never the vision
tower again. The store must come from the same checkpoint (same weights checksum, computed over the checkpoint's
files exactly as the encoder does) and hold the pooled output, else the two towers do not share an embedding space.

Prompts. Each class (normal, abnormal) has an ensemble of templates with an optional ``{body_part}`` placeholder,
filled per image from the store's body part ("XR_WRIST" -> "wrist"; unknown or mixed -> "bone"). The default
ensemble below covers what MURA calls abnormal (fracture, hardware, degenerative change, lesions); a JSON file
``{"normal": [...], "abnormal": [...]}`` replaces it. Prompts are tokenised with ``padding="max_length"`` to the
model's text length (64 for SigLIP): SigLIP was trained that way and pools the last position, so shorter padding
changes every text embedding (and collapses the scores).

Score. With SigLIP's logit(x, t) = exp(logit_scale) * cos(x, t) + logit_bias, an image's class evidence is the mean
logit over that class's prompts, and its abnormality score is sigmoid(mean abnormal logit - mean normal logit): the
two-class softmax over class-averaged logits, as CLIP-style zero-shot classification does. Why not SigLIP's own
per-prompt sigmoid probabilities averaged? They answer "does this caption match?" independently per prompt and sit
near 0 for most prompts after the large negative bias, so their scale says little about normal vs abnormal; the
bias cancels in the difference, and the score ranks images exactly by the gap in cosine similarity. Its scale is not
calibrated either way: the threshold (and optional Platt/isotonic calibration) is chosen on val by the same rules as
``medembed fit``, and the test split is only evaluated.

Run directory: `medembed.runs.record`' (run.json of kind "zeroshot", metrics.json, report.md, figures/, predictions.csv),
the scorer being ``scorer/text_embeddings.safetensors`` (each prompt's pooled text output, logit scale and bias) and
``scorer/prompts.json``.
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sklearn.base import BaseEstimator

from medembed.encoders._hf import SAFETENSORS_SINGLE, HFCheckpoint
from medembed._files import read_json
from medembed.errors import MedembedError
from medembed.scorers.heads._weights import load_finite, tensor_header
from medembed._files import atomic_write_json

CLASSES = ("normal", "abnormal")
DEFAULT_PROMPTS: dict[str, list[str]] = {
    "normal": [
        "an X-ray of a normal {body_part}",
        "a radiograph of a normal {body_part}",
        "a normal {body_part} radiograph with no fracture",
        "an X-ray of a healthy {body_part} with no abnormality",
        "a radiograph of the {body_part} with normal bones and joints",
    ],
    "abnormal": [
        "an X-ray of a {body_part} with a fracture",
        "a radiograph of a fractured {body_part}",
        "an X-ray of a {body_part} with orthopedic hardware",
        "a radiograph of a {body_part} with degenerative joint disease",
        "an X-ray of a {body_part} with a lytic lesion",
        "an abnormal radiograph of the {body_part}",
    ],
}
GENERIC_BODY_PART = "bone"  # fills {body_part} where the store has none, or several ("mixed")
SCORE_RULE = "sigmoid(mean abnormal logit - mean normal logit), logit = exp(logit_scale) * cos + logit_bias"
TEXT_EMBEDDINGS_FILE = "text_embeddings.safetensors"
PROMPTS_FILE = "prompts.json"
_TEXT_PREFIX = "text_model."
_SCALARS = ("logit_scale", "logit_bias")
_TEXT_BATCH = 32


class ZeroShotError(MedembedError):
    """A prompt file, checkpoint or store that zero-shot scoring cannot use."""


def load_prompts(path: Path | None) -> dict[str, list[str]]:
    """The prompt templates of a JSON file (or the defaults), checked: both classes, non-empty strings, only {body_part}."""
    if path is None:
        return {name: list(templates) for name, templates in DEFAULT_PROMPTS.items()}
    try:
        prompts = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ZeroShotError(f"{path}: cannot read the prompts JSON ({error})") from None
    if not isinstance(prompts, dict) or sorted(prompts) != sorted(CLASSES):
        raise ZeroShotError(f'{path}: expected an object with exactly the keys "normal" and "abnormal", each a list of prompts')
    for name in CLASSES:
        templates = prompts[name]
        if not isinstance(templates, list) or not templates or not all(isinstance(t, str) and t.strip() for t in templates):
            raise ZeroShotError(f"{path}: {name!r} must be a non-empty list of non-empty strings")
        for template in templates:
            try:
                fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
            except ValueError as error:  # unbalanced braces
                raise ZeroShotError(f"{path}: prompt {template!r} is not a valid template ({error})") from None
            if fields - {"body_part"}:
                raise ZeroShotError(f"{path}: prompt {template!r} has placeholder(s) {sorted(fields - {'body_part'})}; only {{body_part}} is filled in")
    return {name: list(prompts[name]) for name in CLASSES}


def body_part_phrase(body_part: str) -> str:
    """A store's body part as prompt text: "XR_WRIST" -> "wrist", "hand" -> "hand", "" or "mixed" -> GENERIC_BODY_PART."""
    phrase = str(body_part).strip().lower()
    phrase = phrase.removeprefix("xr_").replace("_", " ").strip()
    return GENERIC_BODY_PART if phrase in ("", "mixed") else phrase


def fill_prompts(prompts: dict[str, list[str]], phrase: str) -> dict[str, list[str]]:
    """Each class's templates with {body_part} replaced by `phrase`."""
    return {name: [template.format(body_part=phrase) for template in prompts[name]] for name in CLASSES}


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> torch.Tensor:
    """`[P, max_length]` int64 token ids, padded with padding="max_length" (how SigLIP was trained) and truncated."""
    encoded = tokenizer(list(texts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return encoded["input_ids"]


class SiglipTextTower:
    """A SigLIP checkpoint's text tower, tokenizer, logit scale and bias; the vision tower is never read."""

    def __init__(self, checkpoint: HFCheckpoint, device: torch.device) -> None:
        # Imported here: `medembed --help` and the rest of the CLI should not pay for importing transformers.
        from transformers import SiglipConfig, SiglipTextModel
        from transformers.initialization import no_init_weights

        config = checkpoint.config_dict()
        if config.get("model_type") != "siglip" or "text_config" not in config:
            raise ZeroShotError(
                f"{checkpoint.model_id}: not a full SigLIP checkpoint (model_type {config.get('model_type')!r}); "
                "zero-shot needs the text tower too (e.g. google/medsiglip-448)"
            )
        text_config = SiglipConfig.from_pretrained(checkpoint.directory()).text_config
        tensors = _read_text_tensors(checkpoint)
        # Every weight is overwritten right away: skip the random initialisation.
        with torch.device(device), no_init_weights():
            model = SiglipTextModel._from_config(text_config, dtype=torch.float32)
        state = {name.removeprefix(_TEXT_PREFIX): tensor for name, tensor in tensors.items() if name.startswith(_TEXT_PREFIX)}
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ZeroShotError(
                f"{checkpoint.model_id}: text tower tensors do not match its config "
                f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})"
            )
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = device
        self.logit_scale = float(tensors["logit_scale"].reshape(-1)[0])
        self.logit_bias = float(tensors["logit_bias"].reshape(-1)[0])
        self.max_length = int(text_config.max_position_embeddings)
        self.tokenizer = _load_tokenizer(checkpoint)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """`[P, D]` float32 pooled text outputs (SigLIP's text features before normalisation)."""
        ids = tokenize(self.tokenizer, texts, self.max_length)
        with torch.inference_mode():
            # No attention mask: SigLIP's text tower was trained on max-length padded ids without one.
            parts = [self.model(input_ids=batch.to(self.device)).pooler_output.float().cpu() for batch in ids.split(_TEXT_BATCH)]
        return torch.cat(parts).numpy()


def _read_text_tensors(checkpoint: HFCheckpoint) -> dict[str, torch.Tensor]:
    """The text tower's tensors and the logit scale/bias, read from only the shards that hold them (float32)."""
    weight_map = checkpoint.weight_map()
    if weight_map is None:
        single = checkpoint.file(SAFETENSORS_SINGLE)
        with safe_open(single, framework="pt") as handle:  # header only: lists names, reads no tensor
            weight_map = dict.fromkeys(handle.keys(), single.name)
    wanted = sorted(name for name in weight_map if name.startswith(_TEXT_PREFIX) or name in _SCALARS)
    missing = [name for name in _SCALARS if name not in wanted]
    if missing or not any(name.startswith(_TEXT_PREFIX) for name in wanted):
        raise ZeroShotError(f"{checkpoint.model_id}: no text tower or {', '.join(_SCALARS)} in the checkpoint; zero-shot needs a full SiglipModel")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted({weight_map[name] for name in wanted}):
        with safe_open(checkpoint.file(shard), framework="pt", device="cpu") as handle:
            for name in wanted:
                if weight_map[name] == shard:
                    tensors[name] = handle.get_tensor(name).to(torch.float32)
    return tensors


def _load_tokenizer(checkpoint: HFCheckpoint) -> Any:
    from transformers import AutoTokenizer

    source = str(checkpoint.directory()) if checkpoint.is_local else checkpoint.model_id
    hub = {} if checkpoint.is_local else {"revision": checkpoint.revision, "cache_dir": checkpoint.cache_dir}
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=checkpoint.offline, **hub)
    except ImportError as error:  # SiglipTokenizer needs the sentencepiece package
        raise ZeroShotError(f"{checkpoint.model_id}: its tokenizer needs a package that is not installed ({error})") from None
    except (OSError, ValueError) as error:
        raise ZeroShotError(f"{checkpoint.model_id}: cannot load its tokenizer ({error})") from None


@dataclass
class PromptClassifier:
    """Prompt text embeddings per body-part phrase and class, with SigLIP's logit scale and bias."""

    text_embeddings: dict[str, dict[str, np.ndarray]]  # phrase -> class -> [P, D] float32, unnormalised
    logit_scale: float  # as stored in the checkpoint: logits use exp(logit_scale)
    logit_bias: float
    prompts: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # phrase -> class -> filled prompts

    @classmethod
    def build(cls, tower: SiglipTextTower, prompts: dict[str, list[str]], phrases: Sequence[str]) -> PromptClassifier:
        """Embed each class's prompts for each body-part phrase (each distinct text once)."""
        filled = {phrase: fill_prompts(prompts, phrase) for phrase in sorted(set(phrases))}
        texts = sorted({text for by_class in filled.values() for texts in by_class.values() for text in texts})
        row = {text: i for i, text in enumerate(texts)}
        embedded = tower.embed(texts)
        vectors = {
            phrase: {name: embedded[[row[t] for t in by_class[name]]] for name in CLASSES} for phrase, by_class in filled.items()
        }
        return cls(vectors, tower.logit_scale, tower.logit_bias, filled)

    def class_logits(self, X: np.ndarray, body_parts: np.ndarray) -> dict[str, np.ndarray]:
        """Mean SigLIP logit over each class's prompts for images X [N, D] with body parts [N]: {class: [N] float64}."""
        images = np.asarray(X, dtype=np.float64)
        images = images / np.linalg.norm(images, axis=1, keepdims=True)
        phrases = np.array([body_part_phrase(part) for part in body_parts], dtype=object)
        logits = {name: np.zeros(len(images)) for name in CLASSES}
        for phrase in np.unique(phrases):
            if phrase not in self.text_embeddings:
                raise ZeroShotError(f"no prompts were embedded for body part {phrase!r}")
            rows = phrases == phrase
            for name in CLASSES:
                text = self.text_embeddings[phrase][name].astype(np.float64)
                text = text / np.linalg.norm(text, axis=1, keepdims=True)
                logits[name][rows] = (np.exp(self.logit_scale) * images[rows] @ text.T + self.logit_bias).mean(axis=1)
        return logits

    def probabilities(self, X: np.ndarray, body_parts: np.ndarray) -> np.ndarray:
        """Abnormality score [N] float64 in (0, 1): sigmoid(mean abnormal logit - mean normal logit)."""
        logits = self.class_logits(X, body_parts)
        gap = logits["abnormal"] - logits["normal"]
        return 0.5 * (1.0 + np.tanh(0.5 * gap))  # the logistic function, without overflow for large gaps

    def save(self, out: Path) -> None:
        """TEXT_EMBEDDINGS_FILE (tensors "<phrase>/<class>" [P, D], logit_scale, logit_bias) and PROMPTS_FILE in `out`."""
        tensors = {
            f"{phrase}/{name}": torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
            for phrase, by_class in self.text_embeddings.items()
            for name, vectors in by_class.items()
        }
        tensors |= {"logit_scale": torch.tensor([self.logit_scale]), "logit_bias": torch.tensor([self.logit_bias])}
        save_file(tensors, str(out / TEXT_EMBEDDINGS_FILE), metadata={"score": SCORE_RULE})
        atomic_write_json(out / PROMPTS_FILE, {"score": SCORE_RULE, "prompts": self.prompts})

    @classmethod
    def load(cls, directory: Path) -> PromptClassifier:
        """The classifier a zero-shot run directory saved."""
        path = Path(directory) / TEXT_EMBEDDINGS_FILE
        if not path.is_file():
            raise ZeroShotError(f"{directory}: no {TEXT_EMBEDDINGS_FILE} (not a zero-shot run)")
        header = tensor_header(path)
        _check_text_header(header, path)
        tensors = load_finite(path)
        vectors: dict[str, dict[str, np.ndarray]] = {}
        for key, tensor in tensors.items():
            if key not in _SCALARS:
                phrase, name = key.rsplit("/", 1)
                vectors.setdefault(phrase, {})[name] = tensor.numpy()
        scale, bias = (float(tensors[name][0]) for name in _SCALARS)
        prompts_file = Path(directory) / PROMPTS_FILE
        document = read_json(prompts_file, "zero-shot prompts file")
        prompts = document.get("prompts") if isinstance(document, dict) else None
        if not isinstance(prompts, dict):
            raise ZeroShotError(f"{prompts_file}: must be an object whose prompts map body parts to each class's prompts")
        return cls(vectors, scale, bias, prompts)


MAX_PROMPTS = 4096  # text embeddings per body part and class; a saved run holds a handful


def _check_text_header(header: dict[str, tuple[str, tuple[int, ...]]], path: Path) -> None:
    """A zero-shot run's text embeddings file, from its header only: logit_scale and logit_bias [1], then
    "<phrase>/<class>" [P, D] float32 tensors of both classes for every phrase, one width D throughout."""
    widths = set()
    classes: dict[str, set[str]] = {}
    for key, (dtype, shape) in header.items():
        if key in _SCALARS:
            if dtype != "F32" or shape != (1,):
                raise ZeroShotError(f"{path}: {key} must be one float32 number, is {dtype} {shape}")
            continue
        phrase, _, name = key.rpartition("/")
        if not phrase or name not in CLASSES or dtype != "F32" or len(shape) != 2 or not (0 < shape[0] <= MAX_PROMPTS) or not 0 < shape[1] <= 65536:
            raise ZeroShotError(f"{path}: tensor {key!r} ({dtype} {shape}) is not a body part's prompt embeddings for one of {', '.join(CLASSES)}")
        widths.add(shape[1])
        classes.setdefault(phrase, set()).add(name)
    if any(name not in header for name in _SCALARS) or len(widths) != 1 or any(found != set(CLASSES) for found in classes.values()):
        raise ZeroShotError(f"{path}: needs logit_scale, logit_bias and, for every body part, both classes' embeddings of one width")


def check_store_matches(store_fingerprint: dict[str, str], checkpoint_fingerprint: dict[str, str], store: Path) -> list[str]:
    """Refuse a store whose image embeddings are not this checkpoint's pooled output; notes on harmless differences.

    The weights checksum decides (the same files under another name or path are the same model).
    """
    problems = []
    if store_fingerprint.get("encoder") != "medsiglip":
        problems.append(f"it was made with encoder {store_fingerprint.get('encoder')!r}, not 'medsiglip'")
    elif store_fingerprint.get("embedding_kind") != "pooler_output":
        problems.append(f"it holds {store_fingerprint.get('embedding_kind')!r}, not the pooled output that shares the text space")
    elif store_fingerprint.get("weights_sha256") != checkpoint_fingerprint["weights_sha256"]:
        problems.append(
            f"its weights checksum {store_fingerprint.get('weights_sha256', '')[:12]}... (model {store_fingerprint.get('model_id')!r}) "
            f"differs from {checkpoint_fingerprint['weights_sha256'][:12]}... of {checkpoint_fingerprint['model_id']!r}"
        )
    if problems:
        raise ZeroShotError(
            f"{store}: cannot score these embeddings with the text tower of {checkpoint_fingerprint['model_id']!r}: "
            f"{'; '.join(problems)}. Extract the store with `medembed extract --encoder medsiglip` from this same checkpoint"
        )
    if store_fingerprint.get("model_id") != checkpoint_fingerprint["model_id"]:
        return [f"store model {store_fingerprint.get('model_id')!r} and {checkpoint_fingerprint['model_id']!r} have the same weights checksum"]
    return []


class ZeroShotScorer(BaseEstimator):
    """The prompt classifier behind the scoring contract: it consumes a medsiglip store's pooled embeddings and
    the images' body parts; nothing is learned from train (`fit` is a no-op), val only calibrates."""

    kind: ClassVar[str] = "zeroshot"
    consumes: ClassVar[str] = "embeddings"
    columns_used: ClassVar[tuple[str, ...]] = ("body_part",)

    def __init__(self, classifier: PromptClassifier | None = None) -> None:
        self.classifier = classifier

    def fit(self, X: np.ndarray, y: np.ndarray, *, eval_set: Any = None) -> ZeroShotScorer:
        """Nothing to learn: the prompts decide; the protocol calibrates on val."""
        return self

    def predict_proba(self, X: np.ndarray, body_part: np.ndarray | None = None) -> np.ndarray:
        """[N, 2] float64; column 1 is the abnormality score of embeddings X [N, D] (generic prompts without body parts)."""
        parts = np.full(len(X), "", dtype=object) if body_part is None else body_part
        p = self.classifier.probabilities(X, parts)
        return np.column_stack([1.0 - p, p])

    def save(self, directory: Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.classifier.save(Path(directory))

    @classmethod
    def load(cls, directory: Path) -> ZeroShotScorer:
        return cls(PromptClassifier.load(directory))

