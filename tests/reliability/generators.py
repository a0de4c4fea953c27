"""Generators of bad (and awkward but good) image files and manifests, for the reliability suite.

`write_corpus(root)` writes every case under `root` and returns them as `Case`s saying what the decoder and
the header check must answer. Everything is generated (nothing is downloaded) and cheap: the whole corpus,
including a real 30,000 x 30,000 PNG, takes about a second and under a megabyte.
"""

from __future__ import annotations

import csv
import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


@dataclass(frozen=True)
class Case:
    """One file of the corpus.

    `path`: relative to the corpus root. `kind`: the ImageDecodeError kind `decode_image` raises (None: it
    decodes). `reason`: a substring of the decoder's reason. `probe_kind`: what the header check
    (`probe_image`) raises, None where it passes (it reads no pixels: truncated JPEG data and NaN pixels are only
    found by decoding, which `manifest check --decode` does after it).
    """

    path: str
    kind: str | None = None
    reason: str = ""
    probe_kind: str | None = None

    @property
    def good(self) -> bool:
        return self.kind is None

    @property
    def image_id(self) -> str:
        return "id_" + "".join(c if c.isalnum() else "_" for c in self.path.strip())


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_with_header(width: int, height: int) -> bytes:
    """A syntactically valid 8-bit greyscale PNG whose header claims `width` x `height` (no real pixel data)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return _PNG + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b"")


_PNG = b"\x89PNG\r\n\x1a\n"


def real_blank_png(width: int, height: int, bit_depth: int = 1) -> bytes:
    """A complete, valid black greyscale PNG of `width` x `height`, streamed row by row (never held as pixels).

    30,000 x 30,000 at 1 bit: 112 MB of raw rows compress to ~110 kB in about a second.
    """
    row = b"\x00" * (1 + (width * bit_depth + 7) // 8)  # filter byte 0, then the packed samples
    compressor = zlib.compressobj(9)
    block = row * 1000
    parts = [compressor.compress(block) for _ in range(height // 1000)]
    parts += [compressor.compress(row * (height % 1000)), compressor.flush()]
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return _PNG + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def dicom_bytes(stored: np.ndarray, photometric: str = "MONOCHROME2", pixels: bool = True) -> bytes:
    """A real single-frame 16-bit (12 stored) greyscale DICOM file (with preamble and DICM marker)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset("generated", {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "DX"
    dataset.Rows, dataset.Columns = stored.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
    dataset.PixelRepresentation = 0
    if pixels:
        dataset.PixelData = stored.astype(np.uint16).tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _image_bytes(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _noise(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)


def write_corpus(root: Path) -> list[Case]:
    """Write every case under `root` (which must exist) and return them, good ones first."""
    root = Path(root)
    grey = Image.fromarray(_noise((48, 64)))
    colour = Image.fromarray(_noise((64, 64, 3), seed=1))
    stored = (np.arange(40 * 48).reshape(40, 48) * 2) % 4096
    jpeg = _image_bytes(Image.fromarray(_noise((64, 64), seed=2)), "JPEG", quality=90)
    png = _image_bytes(grey, "PNG")
    dicom = dicom_bytes(stored)
    nan = np.ones((48, 48), dtype=np.float32)
    nan[5, 7] = np.nan

    files: dict[str, bytes] = {
        # good, if awkward
        "grey8.png": png,
        "grey16.png": _image_bytes(Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 20).astype(np.uint16)), "PNG"),
        "bit1.png": _image_bytes(grey.convert("1"), "PNG"),
        "palette.png": _image_bytes(colour.convert("P"), "PNG"),
        "cmyk.jpg": _image_bytes(colour.convert("CMYK"), "JPEG"),
        "rgb.jpg": _image_bytes(colour, "JPEG"),
        "float.tif": _image_bytes(Image.fromarray(np.linspace(-3, 5, 48 * 48, dtype=np.float32).reshape(48, 48)), "TIFF"),
        "röntgen_画像.png": png,
        " spaced name.png ": png,
        "dicom_mono1.dcm": dicom_bytes(stored, "MONOCHROME1"),
        "dicom_mono2.dcm": dicom,
        "dicom_mono1_no_suffix": dicom_bytes(stored, "MONOCHROME1"),
        "dicom_mono2_no_suffix": dicom,
        "png_named.dcm": png,
        # bad
        "empty.png": b"",
        "text.png": b"this is a text file, not an image\n",
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpeg[: len(jpeg) * 6 // 10],
        "zero_size.png": png_with_header(0, 10),
        "header_bomb.png": png_with_header(100_000, 100_000),
        "huge_real.png": real_blank_png(30_000, 30_000),
        "dot.png": _image_bytes(Image.new("L", (1, 1)), "PNG"),
        "sliver.png": _image_bytes(Image.new("L", (1, 50_000)), "PNG"),
        "strip.png": _image_bytes(Image.new("L", (800, 40)), "PNG"),
        "nan.tif": _image_bytes(Image.fromarray(nan), "TIFF"),
        "junk.dcm": b"this is not a DICOM file\n" * 4,
        "dicom_cut.dcm": dicom[:-1000],
        "dicom_no_pixels.dcm": dicom_bytes(stored, pixels=False),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "loop.png").symlink_to(root / "loop.png")
    (root / "dangling.png").symlink_to(root / "gone.png")
    (root / "folder.png").mkdir()

    good = [Case(name) for name in list(files)[:14]]
    bad = [
        Case("empty.png", "empty", "empty file (0 bytes)", "empty"),
        Case("text.png", "unrecognised", "not a recognised image format", "unrecognised"),
        Case("truncated.png", "truncated", "truncated image", "truncated"),
        Case("truncated.jpg", "truncated", "truncated JPEG (no end-of-image marker)", None),
        Case("zero_size.png", "zero_size", "zero-size image (0x10)", "zero_size"),
        Case("header_bomb.png", "too_large", "decompression bomb: 100000x100000 = 10,000,000,000 pixels", "too_large"),
        Case("huge_real.png", "too_large", "decompression bomb: 30000x30000 = 900,000,000 pixels", "too_large"),
        Case("dot.png", "too_small", "image is 1x1 px; below the minimum side of 32 px", "too_small"),
        Case("sliver.png", "too_small", "image is 1x50000 px; below the minimum side of 32 px", "too_small"),
        Case("strip.png", "aspect_ratio", "image is 800x40 px; aspect ratio 20.0:1 exceeds the maximum of 10:1", "aspect_ratio"),
        Case("nan.tif", "corrupt", "image holds NaN or infinite pixel values", None),
        Case("junk.dcm", "dicom", "not a readable DICOM file (no 'DICM' marker", "dicom"),
        Case("dicom_cut.dcm", "truncated", "truncated DICOM: pixel data needs", "truncated"),
        Case("dicom_no_pixels.dcm", "dicom", "DICOM file has no pixel data", "dicom"),
        Case("loop.png", "not_a_file", "symbolic-link loop", "not_a_file"),
        Case("dangling.png", "not_found", "broken symbolic link", "not_found"),
        Case("folder.png", "not_a_file", "a directory, not a file", "not_a_file"),
        Case("missing.png", "not_found", "file not found", "not_found"),
    ]
    return good + bad


def write_manifest_csv(path: Path, rows: list[tuple[str, str]], encoding: str = "utf-8") -> Path:
    """A manifest CSV of (image_id, path) rows, written by hand (any text, any encoding), labels 0/1 alternating."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image_id", "path", "label", "split"])
    for i, (image_id, file) in enumerate(rows):
        writer.writerow([image_id, file, str(i % 2), ("train", "val", "test")[i % 3]])
    Path(path).write_bytes(buffer.getvalue().encode(encoding, errors="surrogateescape"))
    return Path(path)


# Manifest rows that are wrong in themselves, whatever the files: (image_id, path, problem code, severity).
BAD_ROWS = [
    ("nul\x00id", "grey8.png", "image_id_control_character", "error"),
    ("new\nline", "grey8.png", "image_id_control_character", "error"),
    ("   ", "grey8.png", "empty_image_id", "error"),
    (" padded", "grey8.png", "image_id_whitespace", "warning"),
    ("escape", "../../etc/passwd", "path_outside_root", "error"),
    ("absolute", "/etc/passwd", "absolute_path", "error"),
    ("twice", "grey8.png", "duplicate_image_id", "error"),
    ("twice", "rgb.jpg", "duplicate_image_id", "error"),
]
