"""Image decoding (PNG, JPEG, TIFF, 8/16-bit, DICOM) and the exact preprocessing each encoder was trained with.

`decode_image` turns a file into float32 pixels in [0, 1]; `PreprocessSpec` turns those pixels into the
`[3, size, size]` tensor an encoder expects. The spec is the one source of truth for an encoder's
preprocessing: its hash goes into the embedding store, so embeddings made with different preprocessing
are never mixed. Both run in DataLoader worker processes, so the spec is a small picklable value.
`probe_image` reads only a file's header (what `medembed manifest check --decode` runs).

Every way a file can be unusable raises `ImageDecodeError` with a one-line `.reason` and a `.kind`
(a stable category, see `DECODE_ERROR_KINDS`); nothing else escapes for bad input. Limits, all from the
header before any pixel is decoded: at most `max_pixels` pixels (decompression bombs), both sides at least
`min_side` px, a long/short side ratio of at most `max_aspect_ratio` (see DEFAULT_MAX_ASPECT_RATIO).

torch and pydicom are imported only where needed, so header checks stay cheap to import.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import os
import stat
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from medembed.errors import MedembedError

if TYPE_CHECKING:
    import torch

# Limits on what is decoded. The defaults are not part of a spec's hash (see PreprocessSpec.to_dict).
DEFAULT_MAX_PIXELS = 100_000_000  # 10,000 x 10,000; a 16-bit greyscale image this size peaks near 0.9 GB to decode
DEFAULT_MIN_SIDE = 32  # below this an image holds no anatomy an encoder can use (and is usually a thumbnail or an icon)
# Zero-padding to a square makes a W x H image max(W, H)^2 pixels: at 10:1 the anatomy fills a tenth of the
# encoder's input (22 px of 224) and the padded copy is 10x the image. Stitched long-leg / full-spine
# radiographs, the most elongated real ones, are about 1:4.
DEFAULT_MAX_ASPECT_RATIO = 10.0

DICOM_SUFFIXES = (".dcm", ".dicom")
_DICOM_MAGIC_OFFSET = 128
_DICOM_MAGIC = b"DICM"
# A DICOM file without the 128-byte preamble (old ACR-NEMA style) starts with an element of group 0002 or 0008.
_PREAMBLE_LESS_DICOM_STARTS = (b"\x02\x00", b"\x08\x00")
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Raster formats PIL reads; a file starting with one of these is decoded as such whatever its suffix.
_RASTER_SIGNATURES = (_PNG_SIGNATURE, b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM", b"GIF87a", b"GIF89a")
_RESIZE_MODES = ("bilinear", "bicubic")
_UINT16_MAX = 65535  # integer sources up to 16 bits travel as uint16 (CompactPixels)
_CONVERT_CHUNK_PIXELS = 1 << 22  # integer -> float conversion runs in strips of ~4 Mpx (32 MB of float64)
# Bump when the meaning of a spec field changes, so old stores' hashes no longer match.
_SPEC_VERSION = 1

# ImageDecodeError.kind -> what it means. "refused" kinds are files that decode but break a limit.
DECODE_ERROR_KINDS = {
    "not_found": "no such file",
    "not_a_file": "not a regular file (a directory, a symbolic-link loop, a device)",
    "io_error": "the file cannot be read",
    "empty": "empty file",
    "unrecognised": "not in a recognised image format",
    "corrupt": "corrupt image data",
    "truncated": "truncated image data",
    "dicom": "not a readable DICOM image",
    "unsupported": "an image kind medembed does not decode",
    "zero_size": "zero-size image",
    "too_large": "too many pixels (decompression bomb)",
    "too_small": "below the minimum side",
    "aspect_ratio": "aspect ratio beyond the maximum",
}
REFUSED_KINDS = ("zero_size", "too_large", "too_small", "aspect_ratio")


class ImageDecodeError(MedembedError):
    """An image file that cannot be turned into pixels; `.reason` is the short cause, the message names the file.

    `.kind` is one of DECODE_ERROR_KINDS (a stable category for grouping, e.g. in manifest validation).
    """

    def __init__(self, path: Path | str, reason: str, kind: str = "corrupt") -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason
        self.kind = kind

    def __reduce__(self):  # picklable across DataLoader workers despite the extra constructor arguments
        return type(self), (self.path, self.reason, self.kind)


@dataclass(frozen=True)
class ImageHeader:
    """What `probe_image` learns from a file's header: `format` ("PNG", "JPEG", "TIFF", "DICOM", ...),
    `width` x `height` in pixels, and `mode` (PIL's mode, or DICOM's PhotometricInterpretation)."""

    format: str
    width: int
    height: int
    mode: str


@dataclass(frozen=True)
class _Limits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO


def decode_image(
    path: Path | str,
    *,
    lenient: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
    min_side: int = DEFAULT_MIN_SIDE,
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO,
) -> np.ndarray:
    """Decode an image file to float32 in [0, 1]: `[H, W]` greyscale (also RGB with equal channels) or `[H, W, 3]`.

    Integer images are scaled by their bit depth's maximum (8-bit /255, 16-bit /65535); float images are
    min-max stretched (NaN or infinite pixels are refused). DICOM is recognised by content: the `DICM` magic
    at byte 128, or a `.dcm`/`.dicom` suffix (or a preamble-less start) on a file that is no PNG/JPEG/TIFF; it
    gets the modality LUT (rescale slope/intercept), then the VOI LUT or window, then min-max to [0, 1],
    inverted for MONOCHROME1. Truncated files are refused unless `lenient`, which decodes a truncated JPEG the
    way PIL's LOAD_TRUNCATED_IMAGES does (missing blocks come out grey) without touching that global.
    From the header, before any pixel is decoded, images are refused with more than `max_pixels` pixels, a side
    under `min_side` px, or a long/short side ratio over `max_aspect_ratio` (None: no limit).
    `draft_size` lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale in the DCT domain, keeping both sides
    >= draft_size: several times faster when the encoder's input is much smaller than the file.
    Memory: the file is read as a stream and integer pixels are converted to float in strips, so a 16-bit
    image of N pixels peaks near 6N bytes (PIL's buffer, then the float32 result), 8-bit greyscale near 5N.
    Raises ImageDecodeError with a short `.reason`.
    """
    path = Path(path)
    limits = _Limits(max_pixels, min_side, max_aspect_ratio)
    with _opened_image(path) as (handle, head, dicom):
        if dicom:
            return _decode_dicom(path, handle, limits)
        return _decode_with_pil(path, handle, head, lenient=lenient, limits=limits, draft_size=draft_size, compact=False)


@dataclass(frozen=True)
class CompactPixels:
    """A decoded image in the smallest form that still holds exactly `decode_image`'s values (what a decoding
    worker sends to the model's device, where `to_unit_float` finishes the conversion).

    `values` is `[H, W]` (greyscale) or `[H, W, 3]` at the decoded size, and the float image is:
    uint8 / uint16 `values` divided by `scale` (255, or the bit depth's maximum: 65535, 4095, ...); with a `lut`
    (DICOM), `lut[values]` (values index the float32 table of the modality + VOI LUT + min-max of each stored
    value); float32 `values` as they are (`scale` 1: float sources, already stretched to [0, 1]).
    """

    values: np.ndarray
    scale: float = 1.0
    lut: np.ndarray | None = None

    def to_float(self) -> np.ndarray:
        """The float32 image in [0, 1] (numpy; the device does the same in `device_preprocess.to_unit_float`)."""
        if self.lut is not None:
            return self.lut[self.values]
        if self.values.dtype == np.float32:
            return self.values
        return self.values.astype(np.float32) / np.float32(self.scale)

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + (self.lut.nbytes if self.lut is not None else 0)


def decode_compact(
    path: Path | str,
    *,
    lenient: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
    min_side: int = DEFAULT_MIN_SIDE,
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO,
) -> CompactPixels:
    """`decode_image` stopped before the float conversion: the same checks, limits and decoded size, and pixels
    as `CompactPixels` (uint8, uint16, or a DICOM LUT index) whose `to_float()` equals `decode_image`'s result
    (to float32 rounding: 16-bit sources are divided in float32 here, in float64 there)."""
    path = Path(path)
    limits = _Limits(max_pixels, min_side, max_aspect_ratio)
    with _opened_image(path) as (handle, head, dicom):
        if dicom:
            return _decode_dicom_compact(path, handle, limits)
        return _decode_with_pil(path, handle, head, lenient=lenient, limits=limits, draft_size=draft_size, compact=True)


def probe_image(
    path: Path | str,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO,
) -> ImageHeader:
    """Check that `path` opens as an image, reading its header but decoding no pixels; return what it says.

    The same format detection and limits as `decode_image`. PIL formats are also `verify()`-ed (PNG chunk
    CRCs, so a truncated PNG is caught); DICOM must hold Rows, Columns and pixel data whose declared length
    fits in the file. Truncated JPEG data is not caught here (no checksum or length; `decode_image` finds it). Raises ImageDecodeError with a short `.reason` and a `.kind`.
    """
    path = Path(path)
    limits = _Limits(max_pixels, min_side, max_aspect_ratio)
    with _opened_image(path) as (handle, head, dicom):
        if dicom:
            dataset = _read_dicom(path, handle, header_only=True)
            header = _dicom_header(path, dataset, limits, _has_dicom_magic(head))
            _check_dicom_pixel_length(path, dataset, os.fstat(handle.fileno()).st_size)
            return header
        image = _open_header(path, handle, head, limits.max_pixels)
        with image:
            _check_size(path, *image.size, limits)
            header = ImageHeader(image.format or "", image.width, image.height, image.mode)
            try:
                image.verify()
            except Exception as error:  # PIL's verify raises many types for broken data
                message = _pil_message(error)
                if "truncated" in message.lower():
                    raise ImageDecodeError(path, f"truncated image ({message})", "truncated") from error
                raise ImageDecodeError(path, f"corrupt image data ({message})", "corrupt") from error
        return header


@contextmanager
def _opened_image(path: Path) -> Iterator[tuple[IO[bytes], bytes, bool]]:
    """(handle, its first bytes, whether it is DICOM) of a regular, non-empty file; a non-DICOM handle is
    rewound to the start. An OSError while it is open becomes an ImageDecodeError naming the file."""
    _check_regular_file(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(_DICOM_MAGIC_OFFSET + 4)
            if not head:
                raise ImageDecodeError(path, "empty file (0 bytes)", "empty")
            dicom = _looks_like_dicom(path, head)
            if not dicom:
                handle.seek(0)
            yield handle, head, dicom
    except OSError as error:
        raise ImageDecodeError(path, f"cannot read file ({error.strerror or error})", "io_error") from error


def check_regular_file(path: Path | str) -> None:
    """Raise ImageDecodeError unless `path` is an existing regular file (following symbolic links).

    Reasons: "file not found", "broken symbolic link", "symbolic-link loop", "a directory, not a file",
    "not a regular file", "path contains a NUL character", "path is not valid text", "cannot open file (...)".
    """
    _check_regular_file(Path(path))


def _check_regular_file(path: Path) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as error:
        reason = "broken symbolic link" if os.path.islink(path) else "file not found"
        raise ImageDecodeError(path, reason, "not_found") from error
    except ValueError as error:  # "embedded null byte"
        raise ImageDecodeError(path, "path contains a NUL character", "not_found") from error
    except UnicodeEncodeError as error:
        raise ImageDecodeError(path, "path is not valid text (cannot be encoded for the file system)", "not_found") from error
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ImageDecodeError(path, "symbolic-link loop", "not_a_file") from error
        raise ImageDecodeError(path, f"cannot open file ({error.strerror or error})", "io_error") from error
    if stat.S_ISDIR(mode):
        raise ImageDecodeError(path, "a directory, not a file", "not_a_file")
    if not stat.S_ISREG(mode):
        raise ImageDecodeError(path, "not a regular file", "not_a_file")


def _has_dicom_magic(head: bytes) -> bool:
    return head[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == _DICOM_MAGIC


def _looks_like_dicom(path: Path, head: bytes) -> bool:
    """DICOM by content: the DICM magic; else a DICOM suffix or a preamble-less start on a non-raster file."""
    if _has_dicom_magic(head):
        return True
    if head.startswith(_RASTER_SIGNATURES):
        return False  # e.g. a PNG named .dcm is decoded as the PNG it is
    return path.suffix.lower() in DICOM_SUFFIXES or head.startswith(_PREAMBLE_LESS_DICOM_STARTS)


def _check_size(path: Path, width: int, height: int, limits: _Limits) -> None:
    if width <= 0 or height <= 0:
        raise ImageDecodeError(path, f"zero-size image ({width}x{height})", "zero_size")
    if width * height > limits.max_pixels:
        raise ImageDecodeError(
            path,
            f"decompression bomb: {width}x{height} = {width * height:,} pixels exceeds max_pixels={limits.max_pixels:,}",
            "too_large",
        )
    if min(width, height) < limits.min_side:
        raise ImageDecodeError(
            path, f"image is {width}x{height} px; below the minimum side of {limits.min_side} px", "too_small"
        )
    ratio = max(width, height) / min(width, height)
    if limits.max_aspect_ratio is not None and ratio > limits.max_aspect_ratio:
        raise ImageDecodeError(
            path,
            f"image is {width}x{height} px; aspect ratio {ratio:.1f}:1 exceeds the maximum of {limits.max_aspect_ratio:g}:1",
            "aspect_ratio",
        )


def _pil_message(error: BaseException) -> str:
    return str(error) or type(error).__name__


def _decode_with_pil(
    path: Path, handle: IO[bytes], head: bytes, *, lenient: bool, limits: _Limits, draft_size: int | None, compact: bool
) -> np.ndarray | CompactPixels:
    """The pixels of a raster file: float32 in [0, 1], or `CompactPixels` when `compact`."""
    try:
        image = _open_header(path, handle, head, limits.max_pixels)
    except ImageDecodeError as error:
        # No raster format matched: a DICOM file without preamble or suffix is the one thing left to try.
        if error.kind == "unrecognised" and head.startswith(_PREAMBLE_LESS_DICOM_STARTS):
            handle.seek(0)
            return _decode_dicom_compact(path, handle, limits) if compact else _decode_dicom(path, handle, limits)
        raise
    if draft_size and image.format == "JPEG":
        image.draft(image.mode, (draft_size, draft_size))
    _check_size(path, *image.size, limits)
    is_jpeg = image.format == "JPEG"
    try:
        image.load()
    except OSError as error:
        # PIL signals a premature end of data only through its message ("image file is truncated ...").
        if "truncated" not in str(error):
            raise ImageDecodeError(path, f"corrupt image data ({_pil_message(error)})", "corrupt") from error
        handle.seek(0)
        data = handle.read()
        if not (lenient and is_jpeg):
            raise ImageDecodeError(path, _truncation_reason(data, is_jpeg, error), "truncated") from error
        # PIL's lenient path feeds libjpeg an end-of-image marker at EOF; do the same on our own copy.
        image = _open_header(path, io.BytesIO(data + _JPEG_EOI), head, limits.max_pixels)
        if draft_size:
            image.draft(image.mode, (draft_size, draft_size))
        try:
            image.load()
        except OSError as second_error:
            raise ImageDecodeError(path, f"truncated JPEG, unrecoverable ({second_error})", "truncated") from second_error
    except (ValueError, SyntaxError, struct.error, EOFError) as error:
        raise ImageDecodeError(path, f"corrupt image data ({_pil_message(error)})", "corrupt") from error
    return _pil_to_compact(path, image) if compact else _pil_to_float(path, image)


def _open_header(path: Path, source: IO[bytes], head: bytes, max_pixels: int) -> Image.Image:
    """Parse the header only (PIL decodes pixels lazily), mapping PIL's errors to ImageDecodeError."""
    try:
        with warnings.catch_warnings():
            # We enforce our own max_pixels; PIL's warning threshold is unrelated to it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(source)
    except Image.DecompressionBombError as error:
        # beyond PIL's own hard limit (2 x Image.MAX_IMAGE_PIXELS); a PNG's header says the size
        if head.startswith(_PNG_SIGNATURE) and len(head) >= 24:
            width, height = struct.unpack(">II", head[16:24])
            reason = f"decompression bomb: {width}x{height} = {width * height:,} pixels exceeds max_pixels={max_pixels:,}"
        else:
            reason = f"decompression bomb: {error}"
        raise ImageDecodeError(path, reason, "too_large") from error
    except UnidentifiedImageError as error:
        # PIL refuses zero-size images as "unidentified"; say what is wrong where the header is a PNG's.
        if head.startswith(_PNG_SIGNATURE) and len(head) >= 24:
            width, height = struct.unpack(">II", head[16:24])
            if width == 0 or height == 0:
                raise ImageDecodeError(path, f"zero-size image ({width}x{height})", "zero_size") from error
        raise ImageDecodeError(path, "not a recognised image format", "unrecognised") from error
    except (OSError, ValueError, SyntaxError, struct.error, EOFError) as error:
        raise ImageDecodeError(path, f"corrupt image header ({_pil_message(error)})", "corrupt") from error


def _truncation_reason(data: bytes, is_jpeg: bool, error: OSError) -> str:
    if is_jpeg and _JPEG_EOI not in data:
        return "truncated JPEG (no end-of-image marker)"
    return f"truncated image ({error})"


def _pil_to_float(path: Path, image: Image.Image) -> np.ndarray:
    """PIL image -> float32 [0, 1], `[H, W]` or `[H, W, 3]`; alpha is dropped. Closes `image`.

    The same values as the whole-array formulas (`/ (2**bits - 1)` in float64, `/ 255.0` in float32), but read
    from PIL's buffer one strip of rows at a time, so only that buffer and the float32 result are alive at once.
    """
    image = _plain_mode(image)
    with image:
        if image.mode.startswith("I"):
            maximum = 2 ** _integer_bit_depth(image) - 1
            out = np.empty((image.height, image.width), dtype=np.float32)
            for start, strip in _strips(image):
                out[start : start + len(strip)] = (strip.astype(np.float64) / maximum).clip(0.0, 1.0)
            return out
        if image.mode == "F":
            return _min_max_strips(path, image)
        grey = image.mode == "L" or all(
            np.array_equal(strip[..., 0], strip[..., 1]) and np.array_equal(strip[..., 1], strip[..., 2])
            for _, strip in _strips(image)
        )
        out = np.empty((image.height, image.width) if grey else (image.height, image.width, 3), dtype=np.float32)
        for start, strip in _strips(image):
            out[start : start + len(strip)] = strip if image.mode == "L" or not grey else strip[..., 0]
        out /= 255.0
        return out


def _pil_to_compact(path: Path, image: Image.Image) -> CompactPixels:
    """PIL image -> `CompactPixels` holding `_pil_to_float`'s values: 8-bit as uint8 (greyscale RGB as one
    channel), integer modes up to 16 bits as uint16 clipped to their maximum (the float path clips after
    dividing: the same values), float and wider integer images as `_pil_to_float` makes them. Closes `image`."""
    if image.mode == "F" or (image.mode.startswith("I") and 2 ** _integer_bit_depth(image) - 1 > _UINT16_MAX):
        return CompactPixels(_pil_to_float(path, image))
    image = _plain_mode(image)
    with image:
        values = np.asarray(image)
        if image.mode.startswith("I"):
            maximum = 2 ** _integer_bit_depth(image) - 1
            return CompactPixels(np.clip(values, 0, maximum).astype(np.uint16), float(maximum))
    if values.ndim == 3 and np.array_equal(values[..., 0], values[..., 1]) and np.array_equal(values[..., 1], values[..., 2]):
        values = values[..., 0]
    return CompactPixels(np.ascontiguousarray(values, dtype=np.uint8), 255.0)


def _plain_mode(image: Image.Image) -> Image.Image:
    """`image` in a mode read as it is (L, RGB, F, I*): 1/LA/La become L, any other mode (P, RGBA, CMYK) RGB."""
    mode = image.mode
    if mode not in ("L", "RGB", "F") and not mode.startswith("I"):
        return _converted(image, "L" if mode in ("1", "LA", "La") else "RGB")
    return image


def _converted(image: Image.Image, mode: str) -> Image.Image:
    with image:
        return image.convert(mode)


def _strips(image: Image.Image):
    """(first row, numpy copy of a strip of rows) over the whole image, ~_CONVERT_CHUNK_PIXELS pixels each."""
    rows = max(1, _CONVERT_CHUNK_PIXELS // max(1, image.width))
    for start in range(0, image.height, rows):
        yield start, np.asarray(image.crop((0, start, image.width, min(image.height, start + rows))))


def _min_max_strips(path: Path, image: Image.Image) -> np.ndarray:
    """`_min_max` of a float ("F") image, read strip by strip (PIL's buffer and the result only)."""
    low, high = np.inf, -np.inf
    for _, strip in _strips(image):
        if not np.isfinite(strip).all():
            raise ImageDecodeError(path, "image holds NaN or infinite pixel values", "corrupt")
        low, high = min(low, float(strip.min())), max(high, float(strip.max()))
    out = np.zeros((image.height, image.width), dtype=np.float32)
    if high > low:
        for start, strip in _strips(image):
            out[start : start + len(strip)] = (strip.astype(np.float64) - low) / (high - low)
    return out


def _integer_bit_depth(image: Image.Image) -> int:
    """The real bit depth of an integer-mode image: TIFF's BitsPerSample (12-bit stays 12), else 16 (PNG's I;16/I)."""
    if image.format == "TIFF":
        bits = image.tag_v2.get(258)
        if isinstance(bits, tuple):
            bits = bits[0]
        if bits:
            return int(bits)
    return 16


def _min_max(array: np.ndarray, path: Path) -> np.ndarray:
    """Stretch to [0, 1] as float32 (computed in float64, in strips); a constant image becomes all zeros.

    Raises ImageDecodeError for NaN or infinite values (a float TIFF can hold them; they would poison the embedding).
    """
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ImageDecodeError(path, "image holds NaN or infinite pixel values", "corrupt")
    low, high = float(array.min()), float(array.max())
    if high <= low:
        return np.zeros(array.shape, dtype=np.float32)
    out = np.empty(array.shape, dtype=np.float32)
    rows = max(1, _CONVERT_CHUNK_PIXELS // max(1, int(np.prod(array.shape[1:]))))
    for start in range(0, array.shape[0], rows):
        out[start : start + rows] = (array[start : start + rows].astype(np.float64) - low) / (high - low)
    return out


def _min_max_over(table: np.ndarray, present: np.ndarray, path: Path) -> np.ndarray:
    """`table` stretched to [0, 1] by the min and max of `present` (the values the image holds), as `_min_max`
    stretches an image: float64 arithmetic, float32 result, all zeros for a constant image."""
    if present.dtype.kind == "f" and not np.isfinite(present).all():
        raise ImageDecodeError(path, "image holds NaN or infinite pixel values", "corrupt")
    low, high = float(present.min()), float(present.max())
    if high <= low:
        return np.zeros(table.shape, dtype=np.float32)
    return ((table.astype(np.float64) - low) / (high - low)).astype(np.float32)


def _read_dicom(path: Path, handle: IO[bytes], header_only: bool):
    """pydicom's dataset of `handle` (force=True: preamble-less files too); errors -> ImageDecodeError."""
    import pydicom  # imported here: slow to import and only DICOM files need it

    handle.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about each oddity of a malformed file
            # defer_size: large values (the pixel data) are not read, only noted, when checking the header
            return pydicom.dcmread(handle, force=True, defer_size=1024 if header_only else None)
    except Exception as error:  # pydicom raises many types for malformed files
        raise ImageDecodeError(path, f"not a readable DICOM file ({_pil_message(error)})", "dicom") from error


def _dicom_header(path: Path, dataset, limits: _Limits, magic: bool) -> ImageHeader:
    """Rows/Columns/pixel data present, one frame, within the limits; else ImageDecodeError.

    `magic`: the file has the DICM marker; without it, a file that yields no image is called not DICOM at all.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows, columns = dataset.get("Rows"), dataset.get("Columns")
            has_pixels = "PixelData" in dataset
            frames = dataset.get("NumberOfFrames", 1)
            photometric = str(dataset.get("PhotometricInterpretation", ""))
            rows, columns = (None if v is None else int(v) for v in (rows, columns))
            frames = int(frames or 1)
    except Exception as error:  # values of the wrong type in a malformed file
        raise ImageDecodeError(path, f"not a readable DICOM file ({_pil_message(error)})", "dicom") from error
    if not has_pixels and not magic:
        raise ImageDecodeError(path, "not a readable DICOM file (no 'DICM' marker at byte 128 and no image data)", "dicom")
    if not has_pixels:
        raise ImageDecodeError(path, "DICOM file has no pixel data", "dicom")
    if rows is None or columns is None:
        raise ImageDecodeError(path, "DICOM file has pixel data but no Rows/Columns", "dicom")
    _check_size(path, columns, rows, limits)
    if frames != 1:
        raise ImageDecodeError(path, f"multi-frame DICOM ({frames} frames) is not supported", "unsupported")
    return ImageHeader("DICOM", columns, rows, photometric)


def _check_dicom_pixel_length(path: Path, dataset, file_size: int) -> None:
    """A pixel data element whose declared length runs past the end of the file: truncated (header check only)."""
    try:
        raw = dataset.get_item("PixelData", keep_deferred=True)  # the raw element: its length, not its bytes
        defined = raw is not None and raw.length != 0xFFFFFFFF  # undefined length: encapsulated (compressed) data
        end = raw.value_tell + raw.length if defined else None
    except Exception:  # not a raw element (already parsed) or fields of an unexpected type: nothing to check
        return
    if end is not None and end > file_size:
        raise ImageDecodeError(
            path, f"truncated DICOM: pixel data needs {raw.length:,} bytes, the file ends {end - file_size:,} bytes short", "truncated"
        )


def _dicom_dataset(path: Path, handle: IO[bytes], limits: _Limits):
    """The full dataset of a DICOM file whose header passes the checks and limits."""
    handle.seek(0)
    magic = _has_dicom_magic(handle.read(_DICOM_MAGIC_OFFSET + 4))
    dataset = _read_dicom(path, handle, header_only=False)
    _dicom_header(path, dataset, limits, magic)
    _check_dicom_pixel_length(path, dataset, os.fstat(handle.fileno()).st_size)
    return dataset


def _dicom_greyscale(path: Path, dataset, values: np.ndarray) -> np.ndarray:
    """Modality LUT, then VOI LUT or window, of stored `values` (any shape: the LUTs act value by value)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(apply_voi_lut(apply_modality_lut(values, dataset), dataset))
    except Exception as error:  # missing LUT data, bad lengths, ...: pydicom's types vary
        raise ImageDecodeError(path, f"cannot decode DICOM pixel data ({_pil_message(error)})", "dicom") from error


def _decode_dicom_compact(path: Path, handle: IO[bytes], limits: _Limits) -> CompactPixels:
    """`_decode_dicom`'s values as `CompactPixels`: integer greyscale as a uint16 index into the float32 table
    of every stored value from the smallest to the largest (its LUTs and min-max computed once per value,
    the min-max over the values present); colour as its stored integers; anything else as float32."""
    dataset = _dicom_dataset(path, handle, limits)
    pixels = _dicom_pixel_array(path, dataset)
    if pixels.dtype.kind not in "iu":
        return CompactPixels(_dicom_to_float(path, dataset, pixels))
    if int(dataset.get("SamplesPerPixel", 1)) == 3:
        maximum = 2 ** int(dataset.BitsStored) - 1
        if maximum > _UINT16_MAX:
            return CompactPixels(_dicom_to_float(path, dataset, pixels))
        return CompactPixels(np.clip(pixels, 0, maximum).astype(np.uint8 if maximum <= 255 else np.uint16), float(maximum))
    if pixels.ndim != 2:
        raise ImageDecodeError(path, f"DICOM pixel data has shape {pixels.shape}, expected one greyscale frame", "unsupported")
    low, high = int(pixels.min()), int(pixels.max())
    if high - low > _UINT16_MAX:
        return CompactPixels(_dicom_to_float(path, dataset, pixels))
    index = (pixels.astype(np.int64) - low).astype(np.uint16)
    table = _dicom_greyscale(path, dataset, np.arange(low, high + 1).astype(pixels.dtype))
    if table.shape != (high - low + 1,):
        raise ImageDecodeError(path, f"DICOM LUT output has shape {table.shape}, expected one value per stored value", "unsupported")
    present = np.bincount(index.ravel(), minlength=len(table)) > 0
    lut = _min_max_over(table, table[present], path)
    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":
        lut = 1.0 - lut
    return CompactPixels(index, lut=lut)


def _dicom_pixel_array(path: Path, dataset) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dataset.pixel_array
    except Exception as error:  # missing codec, bad length, ...: pydicom's types vary
        raise ImageDecodeError(path, f"cannot decode DICOM pixel data ({_pil_message(error)})", "dicom") from error


def _decode_dicom(path: Path, handle: IO[bytes], limits: _Limits) -> np.ndarray:
    dataset = _dicom_dataset(path, handle, limits)
    return _dicom_to_float(path, dataset, _dicom_pixel_array(path, dataset))


def _dicom_to_float(path: Path, dataset, pixels: np.ndarray) -> np.ndarray:
    """Stored DICOM pixels -> float32 in [0, 1]: colour by bit depth; greyscale LUTs, min-max, MONOCHROME1 inverted."""
    if int(dataset.get("SamplesPerPixel", 1)) == 3:
        # Colour DICOM (photographs): pydicom already returns RGB; scale by the stored bit depth.
        return (pixels.astype(np.float64) / (2 ** int(dataset.BitsStored) - 1)).clip(0, 1).astype(np.float32)
    values = _dicom_greyscale(path, dataset, pixels)
    if values.ndim != 2:
        raise ImageDecodeError(path, f"DICOM pixel data has shape {values.shape}, expected one greyscale frame", "unsupported")
    grey = _min_max(values, path)
    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":
        grey = 1.0 - grey
    return grey


# Decoding limits carried by a spec; omitted from its dict (hence its hash) while at their defaults, so
# specs and stores made before these fields existed keep their hashes.
_LIMIT_DEFAULTS = {
    "min_side": DEFAULT_MIN_SIDE,
    "max_pixels": DEFAULT_MAX_PIXELS,
    "max_aspect_ratio": DEFAULT_MAX_ASPECT_RATIO,
}


@dataclass(frozen=True)
class PreprocessSpec:
    """How decoded `[0, 1]` pixels become an encoder's input; the one source of truth, hashed into the store.

    Steps, in order: zero-pad to a square with the image centred (the odd pixel goes bottom/right, as in
    HAI-DEF's `_zero_pad_image_to_square`) when `pad_to_square`, else stretch; resize to `size` x `size`
    (`resize` = "bilinear" | "bicubic", half-pixel centres, `antialias` when shrinking); clip to [0, 1];
    grey -> `channels`; subtract `mean`, divide by `std` (per channel, in [0, 1] units).
    Decoding (`load`/`decode`): strict unless `lenient_decoding`; JPEG DCT draft when `jpeg_draft`; files are
    refused (ImageDecodeError, so a failed-table reason) with a side under `min_side`, more than `max_pixels`
    pixels, or a side ratio over `max_aspect_ratio` (None: no limit). The three limits enter `to_dict` and the
    hash only when they differ from DEFAULT_MIN_SIDE, DEFAULT_MAX_PIXELS, DEFAULT_MAX_ASPECT_RATIO.
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
    min_side: int = DEFAULT_MIN_SIDE
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO

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
        if int(self.min_side) < 1 or int(self.max_pixels) < 1:
            raise ValueError(f"PreprocessSpec.min_side and .max_pixels must be >= 1, got {self.min_side}, {self.max_pixels}")
        if self.max_aspect_ratio is not None and not float(self.max_aspect_ratio) >= 1.0:
            raise ValueError(f"PreprocessSpec.max_aspect_ratio must be >= 1 or None, got {self.max_aspect_ratio}")
        # Tuples (not lists) keep the spec hashable and its JSON canonical.
        object.__setattr__(self, "mean", tuple(float(value) for value in self.mean))
        object.__setattr__(self, "std", tuple(float(value) for value in self.std))
        object.__setattr__(self, "min_side", int(self.min_side))
        object.__setattr__(self, "max_pixels", int(self.max_pixels))
        if self.max_aspect_ratio is not None:
            object.__setattr__(self, "max_aspect_ratio", float(self.max_aspect_ratio))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field plus the spec version; decoding limits only where not default."""
        fields = dataclasses.asdict(self)
        fields["mean"], fields["std"] = list(self.mean), list(self.std)
        for name, default in _LIMIT_DEFAULTS.items():
            if fields[name] == default:
                del fields[name]
        return {"version": _SPEC_VERSION, **fields}

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> PreprocessSpec:
        """Rebuild a spec from `to_dict()` output (e.g. read back from a store)."""
        fields = dict(fields)
        version = fields.pop("version", _SPEC_VERSION)
        if version != _SPEC_VERSION:
            raise MedembedError(f"preprocessing spec version {version} is not supported (expected {_SPEC_VERSION})")
        return cls(**{**fields, "mean": tuple(fields["mean"]), "std": tuple(fields["std"])})

    def describe(self) -> str:
        """The preprocessing in words, e.g. "zero-pad to square, resize to 448 px (bilinear, no antialiasing),
        (x - 0.5) / 0.5, 3 channels"."""
        geometry = "zero-pad to square" if self.pad_to_square else "stretch to square"
        aliasing = "antialiased" if self.antialias else "no antialiasing"
        norm = ", ".join(dict.fromkeys(f"(x - {m:.4g}) / {d:.4g}" for m, d in zip(self.mean, self.std)))
        extras = [label for flag, label in ((self.jpeg_draft, "JPEG draft decoding"), (self.lenient_decoding, "lenient decoding")) if flag]
        return ", ".join([geometry, f"resize to {self.size} px ({self.resize}, {aliasing})", f"x in [0, 1] -> {norm}",
                          f"{self.channels} channel{'s' if self.channels != 1 else ''}", *extras])

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): the text that is hashed and stored."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def hash(self) -> str:
        """First 16 hex digits of the sha256 of `to_json()`."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()[:16]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """`[H, W]` or `[H, W, 3]` float in [0, 1] -> `[channels, size, size]` float32, normalised."""
        import torch

        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
            raise ValueError(f"expected [H, W] or [H, W, 3] pixels, got shape {image.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        # Resize grey images as one channel (3x less work) and expand afterwards.
        tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
        return self.transform(tensor[None])[0].numpy()

    def transform(self, batch: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The spec's tensor steps on `[N, C, H, W]` float32 in [0, 1] (C = 1 or 3, on any device) ->
        `[N, channels, size, size]` (written into `out` when given): what `__call__` runs on one image, and
        the device path on a bucket of same-sized images (`medembed.extract.device_preprocess`)."""
        import torch
        import torch.nn.functional as F

        if self.channels == 1 and batch.shape[1] == 3:
            batch = (0.299 * batch[:, 0] + 0.587 * batch[:, 1] + 0.114 * batch[:, 2])[:, None]
        if self.pad_to_square:
            batch = _pad_to_square(batch)
        batch = F.interpolate(batch, size=(self.size, self.size), mode=self.resize, align_corners=False, antialias=self.antialias)
        batch = batch.clamp_(0.0, 1.0).expand(-1, self.channels, -1, -1)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=batch.device)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32, device=batch.device)[:, None, None]
        return torch.sub(batch, mean, out=out).div_(std) if out is not None else (batch - mean) / std

    def decode(self, path: Path | str) -> np.ndarray:
        """`decode_image(path)` with this spec's decoding settings (leniency, JPEG draft, limits)."""
        return decode_image(path, **self._decoding())

    def load(self, path: Path | str) -> np.ndarray:
        """Decode `path` (`decode`) and preprocess it: `[channels, size, size]` float32."""
        return self(self.decode(path))

    def decode_compact(self, path: Path | str) -> CompactPixels:
        """`decode_compact(path)` with this spec's decoding settings: what a worker sends when the pad, resize
        and normalisation run on the model's device (`medembed.extract.device_preprocess`)."""
        return decode_compact(path, **self._decoding())

    def _decoding(self) -> dict[str, Any]:
        """The decoding settings of this spec, as `decode_image` and `decode_compact` take them."""
        return {
            "lenient": self.lenient_decoding,
            "draft_size": self.size if self.jpeg_draft else None,
            "max_pixels": self.max_pixels,
            "min_side": self.min_side,
            "max_aspect_ratio": self.max_aspect_ratio,
        }


def _pad_to_square(tensor: torch.Tensor) -> torch.Tensor:
    """`[..., H, W]` -> `[..., S, S]`, S = max(H, W), zeros around the centred image; the odd pixel goes after."""
    import torch.nn.functional as F

    height, width = tensor.shape[-2:]
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
