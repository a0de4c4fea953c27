"""Deterministic image corruptions at five severities, for testing how a head degrades on worse radiographs.

Corruptions act on decoded pixels (float32 in [0, 1], `[H, W]` or `[H, W, 3]`, as `decode_image` returns them),
before the encoder's own preprocessing. Severity tables follow ImageNet-C (Hendrycks & Dietterich, ICLR 2019)
where it has the corruption; gamma is ours:

    corruption  parameter                        severity 1     2      3      4      5
    noise       Gaussian sd (intensity units)             0.08   0.12   0.18   0.26   0.38
    blur        Gaussian sigma (224-px reference)         1      2      3      4      6
    contrast    factor towards the image mean             0.4    0.3    0.2    0.1    0.05
    gamma       exponent (x ** gamma, darkens mid-greys)  1.22   1.49   1.82   2.23   2.72   (e ** (0.2 s))
    jpeg        JPEG quality (PIL, 8-bit)                 25     18     15     10     7

ImageNet-C's tables were set on 224-px images. Radiographs come at 300 to 3000 px and are resized by the encoder,
so spatial parameters are given on a 224-px reference frame: blur sigma is scaled by L / 224 (L = the long side)
and noise is drawn on a grid of about 224 cells along the long side, each cell L / 224 pixels wide. A severity thus
looks the same after the encoder's resize whatever the file's resolution, and the same corrupted image is fed to
every encoder. JPEG is applied at the stored resolution, as an archive would compress the file.

Noise is the only random corruption. Its random state is derived from the image's content (a hash of its pixels),
the corruption and the severity, never from call order, so a re-run, a resumed extraction or a different number
of DataLoader workers produces exactly the same corrupted image.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from medembed.errors import MedembedError
from medembed.data.images import PreprocessSpec

SEVERITIES = (1, 2, 3, 4, 5)
SEVERITY_TABLE: dict[str, tuple[float, ...]] = {
    "noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "blur": (1.0, 2.0, 3.0, 4.0, 6.0),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    "gamma": tuple(round(math.exp(0.2 * s), 2) for s in SEVERITIES),
    "jpeg": (25, 18, 15, 10, 7),
}
CORRUPTIONS = tuple(SEVERITY_TABLE)
# What each table value is, in its units (reports print them beside the value).
PARAMETER_UNITS: dict[str, str] = {
    "noise": "Gaussian sd, intensity units (pixels in [0, 1])",
    "blur": "Gaussian sigma, px on a 224-px reference (scaled by long side / 224)",
    "contrast": "factor towards the image mean (1 = unchanged)",
    "gamma": "exponent, x ** gamma (1 = unchanged)",
    "jpeg": "JPEG quality (PIL, 1-95; lower is worse)",
}
_PARAMETER_FORMATS = {"noise": "sd {:g} (intensity 0-1)", "blur": "sigma {:g} px (224-px ref.)", "contrast": "factor {:g}",
                      "gamma": "gamma {:g}", "jpeg": "quality {:g}"}
REFERENCE_SIDE = 224  # pixels: the image size ImageNet-C's spatial parameters refer to
# Bump when a corruption's definition changes, so stores made with the old one get another fingerprint.
_CORRUPTION_VERSION = 1


class CorruptionError(MedembedError):
    """An unknown corruption name or a severity outside 1..5."""


def _check(corruption: str, severity: int) -> None:
    if corruption not in SEVERITY_TABLE:
        raise CorruptionError(f"unknown corruption {corruption!r}; choose from {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise CorruptionError(f"severity must be one of {', '.join(map(str, SEVERITIES))}; got {severity!r}")


def parameter(corruption: str, severity: int) -> float:
    """The table value of `corruption` at `severity` (1..5): noise sd, blur sigma, contrast factor, gamma, JPEG quality."""
    _check(corruption, severity)
    return SEVERITY_TABLE[corruption][severity - 1]


def describe_parameter(corruption: str, severity: int) -> str:
    """The table value of `corruption` at `severity` with its unit, for tables: "sd 0.08 (intensity 0-1)",
    "sigma 2 px (224-px ref.)", "factor 0.3", "gamma 1.49", "quality 18"."""
    return _PARAMETER_FORMATS[corruption].format(parameter(corruption, severity))


def image_key(image: np.ndarray) -> str:
    """A content hash of decoded pixels (shape, dtype and bytes): the per-image part of the noise seed."""
    array = np.ascontiguousarray(image)
    digest = hashlib.sha256(f"{array.shape}|{array.dtype}|".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()[:32]


def corrupt(image: np.ndarray, corruption: str, severity: int, key: str | None = None) -> np.ndarray:
    """`image` ([H, W] or [H, W, 3] float in [0, 1]) under `corruption` at `severity` (1..5), float32 in [0, 1].

    `key` identifies the image for the noise seed (default: `image_key(image)`); equal inputs give equal outputs.
    """
    _check(corruption, severity)
    image = np.asarray(image, dtype=np.float32)
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise CorruptionError(f"expected [H, W] or [H, W, 3] pixels, got shape {image.shape}")
    value = SEVERITY_TABLE[corruption][severity - 1]
    if corruption == "noise":
        seed = _seed(key or image_key(image), corruption, severity)
        out = image + _reference_grid_noise(image.shape, value, np.random.default_rng(seed))
    elif corruption == "blur":
        sigma = value * max(image.shape[:2]) / REFERENCE_SIDE
        # Blur within each channel only (sigma 0 along the channel axis).
        out = gaussian_filter(image, sigma=(sigma, sigma, 0)[: image.ndim], mode="reflect")
    elif corruption == "contrast":
        mean = image.mean(axis=(0, 1), keepdims=True)
        out = (image - mean) * value + mean
    elif corruption == "gamma":
        out = np.power(np.clip(image, 0.0, 1.0), value)
    else:
        out = _jpeg_roundtrip(image, int(value))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _seed(key: str, corruption: str, severity: int) -> int:
    digest = hashlib.sha256(f"{key}|{corruption}|{severity}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _reference_grid_noise(shape: tuple[int, ...], sd: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise [shape] constant over cells of L / 224 pixels (nearest-neighbour upsampled), float32."""
    height, width = shape[:2]
    cell = max(1.0, max(height, width) / REFERENCE_SIDE)
    rows, cols = math.ceil(height / cell), math.ceil(width / cell)
    grid = rng.normal(0.0, sd, size=(rows, cols) + tuple(shape[2:])).astype(np.float32)
    row_index = np.minimum((np.arange(height) / cell).astype(np.intp), rows - 1)
    col_index = np.minimum((np.arange(width) / cell).astype(np.intp), cols - 1)
    return grid[row_index][:, col_index]


def _jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode as an 8-bit JPEG at `quality` and decode again (what a lossy archive does to a file)."""
    pixels = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded, dtype=np.float32) / 255.0


@dataclass(frozen=True)
class CorruptedPreprocess:
    """An encoder's PreprocessSpec preceded by one corruption: same `load`/`__call__`/`to_dict`/`hash` surface.

    Its hash covers the corruption, its severity and parameter and the corruption version, so stores of corrupted
    embeddings get their own fingerprint and are never mixed with clean ones. Picklable (DataLoader workers).
    """

    spec: PreprocessSpec
    corruption: str
    severity: int

    def __post_init__(self) -> None:
        _check(self.corruption, self.severity)

    def to_dict(self) -> dict[str, Any]:
        """The wrapped spec's dict plus a "corruption" entry (name, severity, parameter, version)."""
        return {
            **self.spec.to_dict(),
            "corruption": {
                "name": self.corruption,
                "severity": self.severity,
                "parameter": parameter(self.corruption, self.severity),
                "version": _CORRUPTION_VERSION,
            },
        }

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): the text that is hashed and stored."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def hash(self) -> str:
        """First 16 hex digits of the sha256 of `to_json()`."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()[:16]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Decoded `[H, W]` or `[H, W, 3]` pixels -> corrupted -> the spec's `[channels, size, size]` float32."""
        return self.spec(corrupt(image, self.corruption, self.severity))

    def load(self, path: Path | str) -> np.ndarray:
        """Decode `path` as the wrapped spec would, corrupt, preprocess: `[channels, size, size]` float32."""
        return self(self.spec.decode(path))


def parse_corruptions(text: str) -> list[str]:
    """"noise,blur" -> ["noise", "blur"]; "all" -> every corruption. Unknown or repeated names raise CorruptionError."""
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return list(CORRUPTIONS)
    if not names:
        raise CorruptionError(f"no corruption given; choose from {', '.join(CORRUPTIONS)} (or 'all')")
    unknown = [name for name in names if name not in SEVERITY_TABLE]
    if unknown:
        raise CorruptionError(f"unknown corruption(s) {', '.join(unknown)}; choose from {', '.join(CORRUPTIONS)} (or 'all')")
    if len(set(names)) != len(names):
        raise CorruptionError(f"corruption listed twice in {text!r}")
    return names


def parse_severities(text: str) -> list[int]:
    """"1..5" (inclusive range), "1,3,5" or "3" -> sorted severities in 1..5; anything else raises CorruptionError."""
    severities: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        low, dots, high = part.partition("..")
        try:
            bounds = (int(low), int(high)) if dots else (int(part), int(part))
        except ValueError:
            raise CorruptionError(f"cannot read severity {part!r} in {text!r}; write e.g. 1..5, 1,3,5 or 3") from None
        if bounds[0] > bounds[1] or bounds[0] not in SEVERITIES or bounds[1] not in SEVERITIES:
            raise CorruptionError(f"severity {part!r} is outside 1..5 (or an empty range)")
        severities.update(range(bounds[0], bounds[1] + 1))
    return sorted(severities)
