"""Seeded augmented views of train images, embedded once into an augmentation bank (`extract --augment K`).

A view is the decoded image (float32 in [0, 1], as `decode_image` returns it) under, in this order:

    random resized crop  area fraction uniform in [crop_scale, 1], aspect ratio log-uniform in [1/r, r], the
                         position uniform (a crop larger than a side is clipped to it)
    flip                 left-right with probability `flip`
    brightness/contrast  x -> (x - mean) * c + mean + b, c uniform in [1 - contrast, 1 + contrast], b uniform in
                         [-brightness, brightness], clipped to [0, 1]
    the encoder's own preprocessing (pad/resize/normalise, `PreprocessSpec`)
    rotation             uniform in [-rotate, rotate] degrees about the centre, bilinear, at the encoder's input
                         size (cheap there); corners outside the image are black, as the spec's padding is

Every draw comes from a generator seeded by sha256(image id, view index, recipe seed), in a fixed order, never
from call order: a resumed or killed-and-resumed extraction, or another number of DataLoader workers, gives the
same views bit for bit. View 0 is the original image (the main store's row); the bank holds views 1..K.

The bank is a store of its own beside the main one (`bank_path`: ``S.h5`` -> ``S.views.h5``), written by the same
crash-safe writer, so resuming, segments, checksums and `medembed info --verify` hold for it unchanged and the main
store is exactly what it would be without augmentation. Its rows are ids ``<image id>#view<k>`` with extra columns
``source_id`` and ``view``; its fingerprint is the main store's with the preprocess hash of `AugmentedPreprocess`
(the spec plus the recipe and AUGMENT_VERSION), and its attrs hold the recipe (``augment``) and the main store's
fingerprint (``source_fingerprint``). Only train images get views. `medembed.store.views` reads banks and checks all
of it on read.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medembed.data.images import PreprocessSpec
from medembed.errors import MedembedError
from medembed.options.augment import MAX_VIEWS, AugmentOptions

AUGMENT_VERSION = 1  # bump when a transform's definition changes: banks made before get another fingerprint
VIEW_SEPARATOR = "#view"
_VIEW_ID = re.compile(r"^(?P<source>.*)#view(?P<view>[1-9][0-9]*)$", re.DOTALL)
# The bank's extra columns: a view's source image id and its index 1..K.
SOURCE_COLUMN, VIEW_COLUMN = "augment_source", "augment_view"
_RECIPE_KEYS = ("views", "seed", "crop_scale", "crop_ratio", "flip", "rotate", "brightness", "contrast")


@dataclass(frozen=True)
class AugmentRecipe:
    """K views per train image, their seed and each transform's range (validated as `AugmentOptions` does)."""

    views: int
    seed: int
    crop_scale: float
    crop_ratio: float
    flip: float
    rotate: float
    brightness: float
    contrast: float

    def __post_init__(self) -> None:
        if self.views < 1:
            raise MedembedError(f"an augmentation recipe needs at least one view; got {self.views}")
        self.options()  # re-validates every range (a recipe read back from a file is untrusted)

    @classmethod
    def from_options(cls, options: AugmentOptions) -> AugmentRecipe:
        return cls(options.augment, options.augment_seed, float(options.crop_scale), float(options.crop_ratio),
                   float(options.flip), float(options.rotate), float(options.brightness), float(options.contrast))

    def options(self) -> AugmentOptions:
        return AugmentOptions(augment=self.views, augment_seed=self.seed, crop_scale=self.crop_scale, crop_ratio=self.crop_ratio,
                              flip=self.flip, rotate=self.rotate, brightness=self.brightness, contrast=self.contrast)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "version": AUGMENT_VERSION}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: object, where: str) -> AugmentRecipe:
        """The recipe a bank records, refused in one line (naming `where`) when it is not one this version writes."""
        try:
            fields = json.loads(str(text))
        except json.JSONDecodeError:
            raise MedembedError(f"{where}: its augmentation recipe is not JSON: {str(text)[:80]!r}") from None
        if not isinstance(fields, dict) or set(fields) != {*_RECIPE_KEYS, "version"}:
            raise MedembedError(f"{where}: its augmentation recipe has keys {sorted(fields) if isinstance(fields, dict) else type(fields).__name__}, expected {sorted({*_RECIPE_KEYS, 'version'})}")
        if fields["version"] != AUGMENT_VERSION:
            raise MedembedError(f"{where}: augmentation recipe version {fields['version']!r}; this medembed reads version {AUGMENT_VERSION}")
        for key in ("views", "seed"):
            if isinstance(fields[key], bool) or not isinstance(fields[key], int):
                raise MedembedError(f"{where}: augmentation recipe {key} must be an integer; got {fields[key]!r}")
        for key in _RECIPE_KEYS[2:]:
            if isinstance(fields[key], bool) or not isinstance(fields[key], (int, float)):
                raise MedembedError(f"{where}: augmentation recipe {key} must be a number; got {fields[key]!r}")
        try:
            return cls(**{key: fields[key] if key in ("views", "seed") else float(fields[key]) for key in _RECIPE_KEYS})
        except MedembedError as error:
            raise MedembedError(f"{where}: bad augmentation recipe ({error})") from None

    def describe(self) -> str:
        return (f"{self.views} view(s) per train image, seed {self.seed}: crop area >= {self.crop_scale:g} (ratio 1/{self.crop_ratio:.3g}.."
                f"{self.crop_ratio:.3g}), flip p {self.flip:g}, rotate +-{self.rotate:g} deg, brightness +-{self.brightness:g}, "
                f"contrast x[{1 - self.contrast:g}, {1 + self.contrast:g}]")


def view_id(image_id: str, view: int) -> str:
    """The bank row id of view `view` (1..K) of `image_id`; `parse_view_id` inverts it."""
    return f"{image_id}{VIEW_SEPARATOR}{int(view)}"


def parse_view_id(text: str) -> tuple[str, int] | None:
    """(image id, view) of a bank row id, or None when it is not one."""
    match = _VIEW_ID.match(str(text))
    if match is None or int(match["view"]) > MAX_VIEWS:
        return None
    return match["source"], int(match["view"])


def view_seed(image_id: str, view: int, seed: int) -> int:
    digest = hashlib.sha256(f"{image_id}\x1f{int(view)}\x1f{int(seed)}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "little")


@dataclass(frozen=True)
class ViewDraw:
    """The random parameters of one view (drawn by `draw`)."""

    top: float  # crop box, as fractions of the image's height and width
    left: float
    height: float
    width: float
    flip: bool
    brightness: float
    contrast: float
    angle: float  # degrees


def draw(recipe: AugmentRecipe, image_id: str, view: int) -> ViewDraw:
    """The parameters of view `view` of `image_id`: a function of (image id, view, recipe) only."""
    rng = np.random.default_rng(view_seed(image_id, view, recipe.seed))
    u = rng.random(8)  # always eight draws, in this order, whatever the recipe
    area = recipe.crop_scale + (1.0 - recipe.crop_scale) * u[0]
    log_ratio = math.log(recipe.crop_ratio) * (2 * u[1] - 1)
    ratio = math.exp(log_ratio)
    height, width = min(1.0, math.sqrt(area / ratio)), min(1.0, math.sqrt(area * ratio))
    return ViewDraw(
        top=(1.0 - height) * u[2], left=(1.0 - width) * u[3], height=height, width=width,
        flip=bool(u[4] < recipe.flip), brightness=recipe.brightness * (2 * u[5] - 1),
        contrast=1.0 + recipe.contrast * (2 * u[6] - 1), angle=recipe.rotate * (2 * u[7] - 1),
    )


def augment_decoded(image: np.ndarray, params: ViewDraw) -> np.ndarray:
    """Crop, flip and brightness/contrast of decoded `[H, W]` or `[H, W, 3]` pixels in [0, 1] (float32 out)."""
    rows, cols = image.shape[:2]
    top, left = int(round(params.top * rows)), int(round(params.left * cols))
    height, width = max(1, int(round(params.height * rows))), max(1, int(round(params.width * cols)))
    out = np.asarray(image[top : top + height, left : left + width], dtype=np.float32)
    if params.flip:
        out = out[:, ::-1]
    mean = out.mean(axis=(0, 1), keepdims=True)
    return np.clip((out - mean) * params.contrast + mean + params.brightness, 0.0, 1.0).astype(np.float32)


def rotate_input(pixels: np.ndarray, angle: float, spec: PreprocessSpec) -> np.ndarray:
    """`[C, S, S]` normalised encoder input rotated by `angle` degrees about its centre (bilinear); what falls
    outside is black in the spec's normalisation."""
    if angle == 0.0:
        return pixels
    import torch
    import torch.nn.functional as F

    theta = math.radians(angle)
    matrix = torch.tensor([[math.cos(theta), -math.sin(theta), 0.0], [math.sin(theta), math.cos(theta), 0.0]], dtype=torch.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(pixels))[None]
    grid = F.affine_grid(matrix[None], list(tensor.shape), align_corners=False)
    black = torch.tensor([(0.0 - m) / s for m, s in zip(spec.mean, spec.std)], dtype=torch.float32)[:, None, None]
    # rotate the offset from black, so the corners that come from outside are black, not the normalised zero
    rotated = F.grid_sample(tensor - black, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0] + black
    return rotated.numpy().astype(np.float32)


@dataclass(frozen=True)
class AugmentedPreprocess:
    """An encoder's PreprocessSpec with the views of `recipe`: the `to_dict`/`to_json`/`hash` surface of a spec (its
    hash covers the recipe and AUGMENT_VERSION: a bank's fingerprint), and `load_view` for one view. Picklable."""

    spec: PreprocessSpec
    recipe: AugmentRecipe

    def to_dict(self) -> dict[str, Any]:
        return {**self.spec.to_dict(), "augment": self.recipe.to_dict()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def hash(self) -> str:
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()[:16]

    def load_view(self, path: Path | str, image_id: str, view: int) -> np.ndarray:
        """View `view` (1..K) of the image at `path` whose id is `image_id`: `[channels, size, size]` float32."""
        params = draw(self.recipe, image_id, view)
        return rotate_input(self.spec(augment_decoded(self.spec.decode(path), params)), params.angle, self.spec)
