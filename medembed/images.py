"""Image decoding (PNG, JPEG, TIFF, 8/16-bit, DICOM) and the exact preprocessing each encoder was trained with.

`decode_image` turns a file into float32 pixels in [0, 1]; `PreprocessSpec` turns those pixels into the
`[3, size, size]` tensor an encoder expects. The spec is the one source of truth for an encoder's
preprocessing: its hash goes into the embedding store, so embeddings made with different preprocessing
are never mixed. Both run in DataLoader worker processes, so the spec is a small picklable value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from medembed.errors import MedembedError

_DICOM_MAGIC_OFFSET = 128
_DICOM_SUFFIXES = (".dcm", ".dicom")
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_RESIZE_MODES = ("bilinear", "bicubic")
# Bump when the meaning of a spec field changes, so old stores' hashes no longer match.
_SPEC_VERSION = 1


class ImageDecodeError(MedembedError):
    """An image file that cannot be turned into pixels; `.reason` is the short cause, the message names the file."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def decode_image(
    path: Path | str, *, lenient: bool = False, max_pixels: int = 100_000_000, draft_size: int | None = None
) -> np.ndarray:
    """Decode an image file to float32 in [0, 1]: `[H, W]` greyscale (also RGB with equal channels) or `[H, W, 3]`.

    Integer images are scaled by their bit depth's maximum (8-bit /255, 16-bit /65535). DICOM files (`.dcm`
    or the `DICM` magic) get the modality LUT (rescale slope/intercept), then the VOI LUT or window, then
    min-max to [0, 1], inverted for MONOCHROME1. Truncated files are refused unless `lenient`, which decodes
    a truncated JPEG the way PIL's LOAD_TRUNCATED_IMAGES does (missing blocks come out grey) without
    touching that global. Images over `max_pixels` are refused from the header, before any pixel is decoded.
    `draft_size` lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale in the DCT domain, keeping both sides
    >= draft_size: several times faster when the encoder's input is much smaller than the file.
    Raises ImageDecodeError with a short `.reason`.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageDecodeError(path, "file not found" if not path.exists() else "not a regular file")
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise ImageDecodeError(path, f"cannot read file ({error.strerror or error})") from error
    if not data:
        raise ImageDecodeError(path, "empty file (0 bytes)")
    if _is_dicom(path, data):
        return _decode_dicom(path, data, max_pixels)
    return _decode_with_pil(path, data, lenient=lenient, max_pixels=max_pixels, draft_size=draft_size)


def _is_dicom(path: Path, data: bytes) -> bool:
    return path.suffix.lower() in _DICOM_SUFFIXES or data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == b"DICM"


def _check_size(path: Path, width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageDecodeError(path, f"zero-size image ({width}x{height})")
    if width * height > max_pixels:
        raise ImageDecodeError(
            path, f"decompression bomb: {width}x{height} = {width * height:,} pixels exceeds max_pixels={max_pixels:,}"
        )


def _decode_with_pil(path: Path, data: bytes, *, lenient: bool, max_pixels: int, draft_size: int | None) -> np.ndarray:
    image = _open_header(path, data, draft_size)
    _check_size(path, *image.size, max_pixels)
    is_jpeg = image.format == "JPEG"
    try:
        image.load()
    except OSError as error:
        # PIL signals a premature end of data only through its message ("image file is truncated ...").
        if "truncated" not in str(error):
            raise ImageDecodeError(path, f"corrupt image data ({error})") from error
        if not (lenient and is_jpeg):
            raise ImageDecodeError(path, _truncation_reason(data, is_jpeg, error)) from error
        # PIL's lenient path feeds libjpeg an end-of-image marker at EOF; do the same on our own copy.
        image = _open_header(path, data + _JPEG_EOI, draft_size)
        try:
            image.load()
        except OSError as second_error:
            raise ImageDecodeError(path, f"truncated JPEG, unrecoverable ({second_error})") from second_error
    except (ValueError, SyntaxError) as error:
        raise ImageDecodeError(path, f"corrupt image data ({error})") from error
    return _pil_to_float(image)


def _open_header(path: Path, data: bytes, draft_size: int | None = None) -> Image.Image:
    """Parse the header only (PIL decodes pixels lazily), mapping PIL's errors to ImageDecodeError."""
    try:
        with warnings.catch_warnings():
            # We enforce our own max_pixels; PIL's warning threshold is unrelated to it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if draft_size and image.format == "JPEG":
                image.draft(image.mode, (draft_size, draft_size))
            return image
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(path, f"decompression bomb: {error}") from error
    except UnidentifiedImageError as error:
        # PIL refuses zero-size images as "unidentified"; say what is wrong where the header is a PNG's.
        if data.startswith(_PNG_SIGNATURE) and len(data) >= 24:
            width, height = struct.unpack(">II", data[16:24])
            if width == 0 or height == 0:
                raise ImageDecodeError(path, f"zero-size image ({width}x{height})") from error
        raise ImageDecodeError(path, "not a recognised image format") from error
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageDecodeError(path, f"corrupt image header ({error})") from error


def _truncation_reason(data: bytes, is_jpeg: bool, error: OSError) -> str:
    if is_jpeg and _JPEG_EOI not in data:
        return "truncated JPEG (no end-of-image marker)"
    return f"truncated image ({error})"


def _pil_to_float(image: Image.Image) -> np.ndarray:
    """PIL image -> float32 [0, 1], `[H, W]` or `[H, W, 3]`; alpha is dropped."""
    mode = image.mode
    if mode.startswith("I"):
        bits = _integer_bit_depth(image)
        return (np.asarray(image, dtype=np.float64) / (2**bits - 1)).clip(0.0, 1.0).astype(np.float32)
    if mode == "F":
        return _min_max(np.asarray(image, dtype=np.float32))
    if mode in ("1", "L", "LA", "La"):
        grey = np.asarray(image.convert("L"), dtype=np.uint8)
        return grey.astype(np.float32) / 255.0
    rgb = np.asarray(image if mode == "RGB" else image.convert("RGB"), dtype=np.uint8)
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
        return rgb[..., 0].astype(np.float32) / 255.0
    return rgb.astype(np.float32) / 255.0


def _integer_bit_depth(image: Image.Image) -> int:
    """The real bit depth of an integer-mode image: TIFF's BitsPerSample (12-bit stays 12), else 16 (PNG's I;16/I)."""
    if image.format == "TIFF":
        bits = image.tag_v2.get(258)
        if isinstance(bits, tuple):
            bits = bits[0]
        if bits:
            return int(bits)
    return 16


def _min_max(array: np.ndarray) -> np.ndarray:
    """Stretch to [0, 1] as float32; a constant image becomes all zeros."""
    array = array.astype(np.float64)
    low, high = float(array.min()), float(array.max())
    if high <= low:
        return np.zeros(array.shape, dtype=np.float32)
    return ((array - low) / (high - low)).astype(np.float32)


def _decode_dicom(path: Path, data: bytes, max_pixels: int) -> np.ndarray:
    try:
        dataset = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as error:  # pydicom raises many types for malformed files
        raise ImageDecodeError(path, f"not a readable DICOM file ({error})") from error
    if "PixelData" not in dataset:
        raise ImageDecodeError(path, "DICOM file has no pixel data")
    rows, columns = int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))
    _check_size(path, columns, rows, max_pixels)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ImageDecodeError(path, f"multi-frame DICOM ({frames} frames) is not supported")
    try:
        pixels = dataset.pixel_array
    except Exception as error:  # missing codec, bad length, ...: pydicom's types vary
        raise ImageDecodeError(path, f"cannot decode DICOM pixel data ({error})") from error
    if int(dataset.get("SamplesPerPixel", 1)) == 3:
        # Colour DICOM (photographs): pydicom already returns RGB; scale by the stored bit depth.
        return (pixels.astype(np.float64) / (2 ** int(dataset.BitsStored) - 1)).clip(0, 1).astype(np.float32)
    values = apply_voi_lut(apply_modality_lut(pixels, dataset), dataset)
    grey = _min_max(np.asarray(values))
    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":
        grey = 1.0 - grey
    return grey


@dataclass(frozen=True)
class PreprocessSpec:
    """How decoded `[0, 1]` pixels become an encoder's input; the one source of truth, hashed into the store.

    Steps, in order: zero-pad to a square with the image centred (the odd pixel goes bottom/right, as in
    HAI-DEF's `_zero_pad_image_to_square`) when `pad_to_square`, else stretch; resize to `size` x `size`
    (`resize` = "bilinear" | "bicubic", half-pixel centres, `antialias` when shrinking); clip to [0, 1];
    grey -> `channels`; subtract `mean`, divide by `std` (per channel, in [0, 1] units).
    """

    size: int
    pad_to_square: bool
    resize: str
    antialias: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int = 3
    lenient_decoding: bool = False
    jpeg_draft: bool = False  # decode JPEGs at a reduced DCT scale, still >= size (see decode_image)

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"PreprocessSpec.size must be positive, got {self.size}")
        if self.resize not in _RESIZE_MODES:
            raise ValueError(f"PreprocessSpec.resize must be one of {_RESIZE_MODES}, got {self.resize!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"PreprocessSpec.channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"PreprocessSpec.mean and .std need {self.channels} values each")
        if any(value <= 0 for value in self.std):
            raise ValueError("PreprocessSpec.std must be positive")
        # Tuples (not lists) keep the spec hashable and its JSON canonical.
        object.__setattr__(self, "mean", tuple(float(value) for value in self.mean))
        object.__setattr__(self, "std", tuple(float(value) for value in self.std))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field plus the spec version."""
        fields = dataclasses.asdict(self)
        fields["mean"], fields["std"] = list(self.mean), list(self.std)
        return {"version": _SPEC_VERSION, **fields}

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> PreprocessSpec:
        """Rebuild a spec from `to_dict()` output (e.g. read back from a store)."""
        fields = dict(fields)
        version = fields.pop("version", _SPEC_VERSION)
        if version != _SPEC_VERSION:
            raise MedembedError(f"preprocessing spec version {version} is not supported (expected {_SPEC_VERSION})")
        return cls(**{**fields, "mean": tuple(fields["mean"]), "std": tuple(fields["std"])})

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): the text that is hashed and stored."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def hash(self) -> str:
        """First 16 hex digits of the sha256 of `to_json()`."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()[:16]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """`[H, W]` or `[H, W, 3]` float in [0, 1] -> `[channels, size, size]` float32, normalised."""
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
            raise ValueError(f"expected [H, W] or [H, W, 3] pixels, got shape {image.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        # Resize grey images as one channel (3x less work) and expand afterwards.
        tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
        if self.channels == 1 and tensor.shape[0] == 3:
            tensor = (0.299 * tensor[0] + 0.587 * tensor[1] + 0.114 * tensor[2])[None]
        if self.pad_to_square:
            tensor = _pad_to_square(tensor)
        tensor = F.interpolate(
            tensor[None], size=(self.size, self.size), mode=self.resize, align_corners=False, antialias=self.antialias
        )[0]
        tensor = tensor.clamp_(0.0, 1.0).expand(self.channels, -1, -1)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return ((tensor - mean) / std).numpy()

    def load(self, path: Path | str) -> np.ndarray:
        """Decode `path` (strict unless `lenient_decoding`) and preprocess it: `[channels, size, size]` float32."""
        return self(decode_image(path, lenient=self.lenient_decoding, draft_size=self.size if self.jpeg_draft else None))


def _pad_to_square(tensor: torch.Tensor) -> torch.Tensor:
    """`[C, H, W]` -> `[C, S, S]`, S = max(H, W), zeros around the centred image; the odd pixel goes after."""
    height, width = tensor.shape[1:]
    if height == width:
        return tensor
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    return F.pad(tensor, (left, side - width - left, top, side - height - top))


def medsiglip_spec(size: int = 448) -> PreprocessSpec:
    """MedSigLIP's training/serving preprocessing (Google HAI-DEF medsiglip `serving/predictor.py`).

    Pixels scaled to [0, 1] by bit depth, zero-padded to a square with the image centred, resized
    bilinearly without antialiasing (tf.image.resize's default, as in the model card's example),
    mapped to [-1, 1], grey repeated to three channels.
    """
    return PreprocessSpec(
        size=size, pad_to_square=True, resize="bilinear", antialias=False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
    )
