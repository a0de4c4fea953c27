"""Encoder conformance: does medembed feed an encoder what its authors' code would, and do the offline
encoders still give the embeddings they gave when this was committed?

`check_encoder(name, ...)` runs the bundled test images (`bundled_images()`: 8-bit grey non-square PNG
(300 x 420, with line pairs that alias without antialiasing), 16-bit PNG (64 x 52), square RGB PNG, grey JPEG (470 x 452:
libjpeg's DCT draft decode), 12-bit MONOCHROME1 DICOM; about 30 KB in `encoders/assets/`) through

- medembed's `PreprocessSpec` (what every store uses), and, where the checkpoint ships a
  preprocessor_config.json (SigLIP, Gemma 3 / MedGemma, DINOv2 / RAD-DINO via hf-vision), through the
  checkpoint's own transformers image processor (`AutoImageProcessor` on the local checkpoint directory).
  Both start from medembed's decoded pixels (one decoder, so the comparison isolates pad / resize /
  normalise); the processor gets them rounded to 8-bit RGB, as from a PIL image. Per image: the maximum
  absolute difference between the two inputs in the model's input units (and in 8-bit grey levels), both
  being `[3, S, S]`, and the cosine similarity of the encoder's embeddings of the two inputs;
- for the offline encoders (EfficientNet-Lite0/1/2) a comparison with the golden embeddings in
  `encoders/assets/golden.json` (first 32 dims, 16 block means over all dims, L2 norm, per image), within the
  precision's tolerance (`GOLDEN_TOLERANCE`), so a changed decoder, resize or library that moves an embedding
  is caught. `write_golden()` regenerates the file (after a deliberate change, with a note why).

The result (`ConformanceResult`) prints itself (`lines()`); `ok` is False only when a golden check fails.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medembed.encoders.registry import EncoderError
from medembed.options.encoders import CHECK_PRECISIONS, CheckOptions

if TYPE_CHECKING:
    import torch

    from medembed.encoders.base import Encoder

ASSETS = Path(__file__).parent / "encoders" / "assets"  # the bundled test images and golden embeddings
GOLDEN_FILE = ASSETS / "golden.json"
IMAGE_NAMES = ("grey8_nonsquare.png", "grey16.png", "rgb.png", "grey.jpg", "mono1_12bit.dcm")
GOLDEN_ENCODERS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
HEAD_DIMS = 32
BLOCKS = 16
# Per autocast precision: the largest absolute difference allowed on any recorded value (head dims, block
# means) and the relative one on the norm. Measured on the bundled images (EfficientNet-Lite0/1/2, CPU):
# fp32 run to run (1 or 2 threads) <= 4e-6 abs, 4e-7 rel; a changed preprocessing moves them far more
# (no antialiasing 0.58, no JPEG draft 0.22, mean/std 0.5 instead of 127/255, 128/255: 0.008-0.02), so
# 1e-4 leaves room for other CPUs and still catches each. bf16 autocast on a CPU moves them by up to 0.25 abs
# and 0.066 rel: its tolerance is coarse (a wrong channel layout, scale or network), not a resize check.
# fp16 (3 more mantissa bits than bf16) is set 5x tighter, unmeasured.
GOLDEN_TOLERANCE = {"fp32": (1e-4, 1e-5), "bf16": (0.5, 0.1), "fp16": (0.1, 0.02)}
assert tuple(GOLDEN_TOLERANCE) == CHECK_PRECISIONS, "one tolerance per precision CheckOptions accepts"
_GOLDEN_FORMAT = 1


@dataclass
class ImageCheck:
    """One bundled image's figures; None where a comparison does not apply."""

    image: str
    max_pixel_diff: float | None = None  # medembed vs checkpoint processor input, model input units
    max_pixel_diff_levels: float | None = None  # the same in 8-bit grey levels (x std x 255)
    cosine: float | None = None  # embedding of medembed's input vs of the processor's input
    golden_max_abs_diff: float | None = None
    golden_norm_rel_diff: float | None = None
    golden_ok: bool | None = None
    note: str = ""


@dataclass
class ConformanceResult:
    """What `check_encoder` found; `ok` is False only when a golden comparison failed."""

    encoder: str
    model_id: str
    preprocess_hash: str
    processor: str | None  # the checkpoint processor's class name; None: see processor_note
    precision: str
    golden: str  # "checked", or why not
    tolerance: tuple[float, float] | None
    images: list[ImageCheck] = field(default_factory=list)
    processor_note: str = ""

    @property
    def ok(self) -> bool:
        return all(image.golden_ok is not False for image in self.images)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ok": self.ok}

    def lines(self) -> list[str]:
        """A human-readable report, one line per image."""
        out = [
            f"encoder      {self.encoder} ({self.model_id}), precision {self.precision}",
            f"store uses   medembed PreprocessSpec {self.preprocess_hash}",
            f"processor    {self.processor or 'none (' + self.processor_note + ')'}",
        ]
        tolerance = "" if self.tolerance is None else f" (tolerance {self.tolerance[0]:g} abs, norm {self.tolerance[1]:g} rel)"
        out.append(f"golden       {self.golden}{tolerance}")
        for check in self.images:
            parts = [f"{check.image:20s}"]
            if check.max_pixel_diff is not None:
                parts.append(f"max pixel diff {check.max_pixel_diff:.4f} ({check.max_pixel_diff_levels:.1f} levels)")
            if check.cosine is not None:
                parts.append(f"cosine {check.cosine:.6f}")
            if check.golden_ok is not None:
                verdict = "OK" if check.golden_ok else "FAIL"
                parts.append(f"golden {verdict} (max abs diff {check.golden_max_abs_diff:.2e}, norm {check.golden_norm_rel_diff:.2e} rel)")
            if check.note:
                parts.append(check.note)
            out.append("  ".join(parts))
        out.append("result       " + ("OK" if self.ok else "FAIL: embeddings moved beyond the golden tolerance"))
        return out


def bundled_images() -> list[Path]:
    """The committed test images, in a fixed order."""
    return [ASSETS / name for name in IMAGE_NAMES]


def check_encoder(
    name: str,
    *,
    model_id: str | None = None,
    encoder_options: dict[str, Any] | None = None,
    options: CheckOptions | None = None,
    images: list[Path] | None = None,
) -> ConformanceResult:
    """Run the bundled images (or `images`) through encoder `name` as described in the module doc."""
    from medembed.encoders.runtime import build_encoder, resolve_device, resolve_precision

    options = options or CheckOptions()
    built_options = dict(encoder_options or {})
    if model_id is not None:
        built_options["model_id"] = model_id
    encoder = build_encoder(name, built_options)
    import torch  # once the encoder is built: an unreachable hub has failed in one line before torch loads

    device = resolve_device(options.device)
    precision = resolve_precision(options.precision, device)
    processor = _checkpoint_processor(encoder)
    golden, golden_status = _golden_for(encoder, precision)
    result = ConformanceResult(
        encoder=name,
        model_id=encoder.model_id,
        preprocess_hash=encoder.preprocess.hash(),
        processor=None if processor is None else type(processor).__name__,
        precision=precision,
        golden=golden_status,
        tolerance=GOLDEN_TOLERANCE[precision] if golden is not None else None,
    )
    if processor is None:
        has_checkpoint = getattr(encoder, "checkpoint", None) is not None
        result.processor_note = "the checkpoint ships no preprocessor_config.json" if has_checkpoint else "not a Hugging Face checkpoint"
    encoder.load(device)
    for path in images or bundled_images():
        check = ImageCheck(Path(path).name)
        decoded = encoder.preprocess.decode(path)
        ours = torch.from_numpy(encoder.preprocess(decoded))
        embedding = _embed(encoder, ours, device, precision)
        if processor is not None:
            _compare_with_processor(check, encoder, processor, decoded, ours, embedding, device, precision)
        if golden is not None:
            _compare_with_golden(check, golden, Path(path), embedding, GOLDEN_TOLERANCE[precision])
        result.images.append(check)
    return result


def _embed(encoder: Encoder, pixels: torch.Tensor, device: torch.device, precision: str) -> np.ndarray:
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        return encoder.embed(pixels[None].to(device)).float().cpu().numpy()[0].astype(np.float64)


def _checkpoint_processor(encoder: Encoder) -> Any | None:
    """transformers' image processor of an HF encoder's checkpoint, or None (no checkpoint or no config)."""
    checkpoint = getattr(encoder, "checkpoint", None)
    if checkpoint is None or checkpoint.file("preprocessor_config.json", required=False) is None:
        return None
    import logging

    from transformers import AutoImageProcessor

    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)  # "falling back to the PIL backend" without torchvision: expected, not news
    try:
        return AutoImageProcessor.from_pretrained(checkpoint.directory())
    except (OSError, ValueError, KeyError, ImportError) as error:
        raise EncoderError(f"{encoder.model_id}: cannot build its image processor ({error})") from error
    finally:
        logger.setLevel(level)


def _compare_with_processor(
    check: ImageCheck,
    encoder: Encoder,
    processor: Any,
    decoded: np.ndarray,
    ours: torch.Tensor,
    our_embedding: np.ndarray,
    device: torch.device,
    precision: str,
) -> None:
    import torch

    rgb = decoded if decoded.ndim == 3 else np.repeat(decoded[..., None], 3, axis=2)
    eight_bit = np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)
    theirs = processor(images=eight_bit, return_tensors="pt")["pixel_values"][0].float()
    if theirs.shape == ours.shape:
        difference = (theirs - ours).abs()
        check.max_pixel_diff = float(difference.max())
        std = torch.tensor(encoder.preprocess.std, dtype=torch.float32)[:, None, None]
        check.max_pixel_diff_levels = float((difference * std * 255.0).max())
    else:
        check.note = f"inputs differ in shape: medembed {tuple(ours.shape)}, processor {tuple(theirs.shape)}"
    try:
        their_embedding = _embed(encoder, theirs, device, precision)
    except (RuntimeError, ValueError) as error:  # e.g. a SigLIP tower given a non-square input
        check.note = (check.note + "; " if check.note else "") + f"processor input not embeddable ({str(error)[:80]})"
        return
    check.cosine = _cosine(our_embedding, their_embedding)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    denominator = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / denominator if denominator > 0 else float("nan")


def summarise(embedding: np.ndarray) -> dict[str, Any]:
    """What golden.json keeps of one embedding: the first 32 dims, 16 block means (every dim counts), the L2 norm."""
    embedding = np.asarray(embedding, dtype=np.float64)
    blocks = np.array_split(embedding, BLOCKS)
    short = lambda value: float(f"{float(value):.8g}")  # noqa: E731  (8 digits: far below any tolerance)
    return {
        "head": [short(v) for v in embedding[:HEAD_DIMS]],
        "block_means": [short(block.mean()) for block in blocks],
        "norm": short(np.linalg.norm(embedding)),
    }


def _identity(encoder: Encoder) -> dict[str, str]:
    fingerprint = encoder.fingerprint()
    return {key: fingerprint[key] for key in ("preprocess_hash", "config_sha256", "weights_sha256", "revision")}


def _golden_for(encoder: Encoder, precision: str) -> tuple[dict[str, Any] | None, str]:
    """(the golden record of this encoder configuration, "checked"), or (None, why there is none)."""
    if encoder.name not in GOLDEN_ENCODERS:
        return None, "none for this encoder (only the offline encoders have golden embeddings)"
    if not GOLDEN_FILE.is_file():
        return None, f"missing: {GOLDEN_FILE}"
    record = json.loads(GOLDEN_FILE.read_text(encoding="utf-8"))["encoders"].get(encoder.name)
    if record is None:
        return None, f"{GOLDEN_FILE.name} has no record of {encoder.name}"
    identity = _identity(encoder)
    if identity["preprocess_hash"] != record["identity"]["preprocess_hash"]:
        return None, "none for these options (the golden embeddings are of the default preprocessing)"
    changed = [key for key, value in identity.items() if record["identity"][key] != value]
    status = "checked" + (f" (note: {', '.join(changed)} differ from when they were recorded)" if changed else "")
    return record, status


def _compare_with_golden(check: ImageCheck, record: dict[str, Any], path: Path, embedding: np.ndarray, tolerance: tuple[float, float]) -> None:
    expected = record["embeddings"].get(path.name)
    if expected is None:
        check.note = "no golden embedding for this image"
        return
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if expected["image_sha256"] != digest:
        check.note = "image file differs from the one the golden embedding was made of"
    got = summarise(embedding)
    values = lambda summary: np.array(summary["head"] + summary["block_means"])  # noqa: E731
    check.golden_max_abs_diff = float(np.abs(values(got) - values(expected)).max())
    check.golden_norm_rel_diff = abs(got["norm"] - expected["norm"]) / max(expected["norm"], 1e-12)
    absolute, relative = tolerance
    check.golden_ok = bool(check.golden_max_abs_diff <= absolute and check.golden_norm_rel_diff <= relative) and math.isfinite(got["norm"])


def write_golden(path: Path = GOLDEN_FILE) -> dict[str, Any]:
    """Recompute golden.json: the default EfficientNet-Lite0/1/2 in fp32 on the CPU over `bundled_images()`,
    one image per forward. Run only after a deliberate change, and say in the commit why embeddings moved."""
    import torch

    from medembed.encoders import get_encoder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encoders = {}
        for name in GOLDEN_ENCODERS:
            encoder = get_encoder(name)
            encoder.load(torch.device("cpu"))
            embeddings = {}
            for image in bundled_images():
                pixels = torch.from_numpy(encoder.preprocess.load(image))
                embeddings[image.name] = {
                    "image_sha256": hashlib.sha256(image.read_bytes()).hexdigest(),
                    **summarise(_embed(encoder, pixels, torch.device("cpu"), "fp32")),
                }
            encoders[name] = {"identity": _identity(encoder), "precision": "fp32", "embeddings": embeddings}
    finally:
        torch.set_num_threads(threads)
    golden = {"format": _GOLDEN_FORMAT, "made_with": _library_versions(), "encoders": encoders}
    Path(path).write_text(json.dumps(golden, indent=1, sort_keys=True, separators=(",", ":")) + "\n", encoding="utf-8")
    return golden


def _library_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {package: version(package) for package in ("torch", "pillow", "numpy", "pydicom", "efficientnet_lite_pytorch")}


def write_test_images(directory: Path = ASSETS) -> list[Path]:
    """(Re)create the bundled test images, deterministically (how encoders/assets/ was made; they are committed, so a
    changed encoder library cannot change them): structured phantoms (a gradient, an ellipse "bone", noise)."""
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20261201)

    def phantom(height: int, width: int, noise: float = 0.05) -> np.ndarray:
        y, x = np.mgrid[0:height, 0:width].astype(np.float64)
        base = 0.15 + 0.35 * x / width + 0.1 * np.sin(y / 5.0)
        bone = ((x - width * 0.55) / (width * 0.22)) ** 2 + ((y - height * 0.45) / (height * 0.35)) ** 2 < 1
        image = base + 0.45 * bone + (noise * rng.standard_normal((height, width)) if noise else 0.0)
        return np.clip(image, 0.0, 1.0)

    def with_line_pairs(image: np.ndarray) -> np.ndarray:
        """Bars of 1-4 px periods in the top quarter, as on a resolution phantom: they alias when an image is
        shrunk without antialiasing, so the large images tell antialiased resizing from plain."""
        image = image.copy()
        height, width = image.shape
        band = height // 4
        for index, period in enumerate((2, 3, 4, 6)):
            left, right = index * width // 4, (index + 1) * width // 4
            columns = (np.arange(left, right) // (period // 2 or 1)) % 2
            image[band // 4 : band, left:right] = 0.2 + 0.6 * columns
        return image

    paths = []
    # portrait, 300 x 420: larger than every encoder input, so the downscale (and its antialiasing) is exercised
    grey8 = np.round(with_line_pairs(phantom(420, 300, noise=0.0)) * 255).astype(np.uint8)
    paths.append(directory / "grey8_nonsquare.png")
    Image.fromarray(grey8, mode="L").save(paths[-1], optimize=True)

    grey16 = np.round(phantom(52, 64) * 65535).astype(np.uint16)  # landscape, low bits matter
    paths.append(directory / "grey16.png")
    Image.fromarray(grey16).save(paths[-1])

    rgb = np.stack([phantom(64, 64), phantom(64, 64) * 0.8, phantom(64, 64)[::-1]], axis=2)  # square: no padding
    paths.append(directory / "rgb.png")
    Image.fromarray(np.round(rgb * 255).astype(np.uint8), mode="RGB").save(paths[-1], optimize=True)

    paths.append(directory / "grey.jpg")
    # 470 x 452: large enough for libjpeg's 1/2 DCT-domain draft decode at 224 px (jpeg_draft specs)
    jpeg = np.round(with_line_pairs(phantom(452, 470, noise=0.0)) * 255).astype(np.uint8)
    Image.fromarray(jpeg, mode="L").save(paths[-1], quality=70)

    paths.append(directory / "mono1_12bit.dcm")
    _write_dicom(paths[-1], np.round(phantom(56, 40) * 4095).astype(np.uint16))
    return paths


def _write_dicom(path: Path, stored: np.ndarray) -> None:
    """A minimal uncompressed 12-bit MONOCHROME1 DX image with a rescale and a window (fixed UIDs: reproducible)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.10.1201.1.1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "DX"
    dataset.PatientID = "medembed-test"
    dataset.Rows, dataset.Columns = stored.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME1"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
    dataset.PixelRepresentation = 0
    dataset.RescaleSlope, dataset.RescaleIntercept = 1, -1024
    dataset.WindowCenter, dataset.WindowWidth = 900, 3000
    dataset.PixelData = stored.astype("<u2").tobytes()
    dataset.save_as(path, enforce_file_format=True)
