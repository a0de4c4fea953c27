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
fingerprint (``source_fingerprint``). Only train images get views. `read_bank` checks all of it on read.
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


def bank_path(store: Path | str) -> Path:
    """Where the augmentation bank of `store` lives: ``S.h5`` -> ``S.views.h5``."""
    store = Path(store)
    return store.with_name(f"{store.stem}.views{store.suffix or '.h5'}")


@dataclass
class TrainViews:
    """Embedded views of train rows, for a head that trains in epochs: `X` `[M, ...]` (the pooled vectors or a
    token level, like the train split's X), `row` `[M]` the train row each view is of, and the bank's recipe."""

    X: np.ndarray
    row: np.ndarray
    recipe: AugmentRecipe

    def check(self, n_rows: int, shape: tuple[int, ...]) -> None:
        """Refuse views that do not fit `n_rows` train rows of inputs shaped `shape` (per row), in one line."""
        row = np.asarray(self.row)
        if self.X.shape[1:] != tuple(shape) or row.shape != (len(self.X),):
            raise MedembedError(f"views of shape {self.X.shape} (rows {row.shape}) do not fit train inputs [N, {', '.join(map(str, shape))}]")
        if not np.issubdtype(row.dtype, np.integer) or (len(row) and (row.min() < 0 or row.max() >= n_rows)):
            raise MedembedError(f"views name train rows outside 0..{n_rows - 1}")

    def draw(self, n_rows: int, rng: np.random.Generator) -> np.ndarray:
        """For each of `n_rows` train rows one choice among its original and its views, uniformly: an index into
        `concatenate([X_train, views.X])` (i for the original of row i, n_rows + m for view m)."""
        counts = np.bincount(self.row, minlength=n_rows)
        order = np.argsort(self.row, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        pick = np.floor(rng.random(n_rows) * (counts + 1)).astype(np.intp)  # 0: the original
        chosen = np.arange(n_rows, dtype=np.intp)
        has_view = pick > 0
        chosen[has_view] = n_rows + order[starts[has_view] + pick[has_view] - 1]
        return chosen

    def record(self) -> dict[str, Any]:
        """What run.json records about the views a fit drew from."""
        return {"recipe": self.recipe.to_dict(), "views": int(len(self.X)),
                "train_rows_with_views": int(len(np.unique(self.row))), "choices_per_row": "the original or one of its views, uniformly, per epoch"}


def load_train_views(stores: list[Path], train_ids: np.ndarray, level: str | None) -> tuple[TrainViews | None, dict[str, Any], list[str]]:
    """The views in the banks of `stores` (shards of one extraction) of the train rows `train_ids`, as X of
    `level` (pooled when None), with what run.json records and notes; (None, {}, []) when no store has a bank.

    Every bank is checked (untrusted input) against its store: its recipe, its fingerprint (the store's, with the
    recipe's preprocess hash), the store fingerprint it records, its dim and levels, and each row's id against its
    source and view columns and the recipe's K; one line refuses a bad bank, shards of which some have a bank and
    some none, or banks of different recipes. Views of images that are not train rows here (the manifest moved
    them to val or test, or they failed) are left out, so val and test never see a view.
    """
    from medembed.store import fingerprint_mismatch, open_store

    stores = [Path(s) for s in stores]
    banks = [bank_path(s) for s in stores]
    present = [b.exists() for b in banks]
    if not any(present):
        return None, {}, []
    if not all(present):
        raise MedembedError(f"refusing to mix shards with and without an augmentation bank: {banks[present.index(False)]} is missing "
                            f"but {banks[present.index(True)]} exists; extract every shard with the same --augment")
    recipes, tables = [], []
    for store_path, path in zip(stores, banks):
        recipe, X, ids = _read_bank(open_store(store_path), open_store(path), level, fingerprint_mismatch)
        recipes.append(recipe)
        tables.append((X, ids))
    for path, recipe in zip(banks[1:], recipes[1:]):
        if recipe != recipes[0]:
            raise MedembedError(f"refusing to mix augmentation banks of different recipes: {banks[0]} ({recipes[0].describe()}) and {path} ({recipe.describe()})")
    position = {image_id: k for k, image_id in enumerate(np.asarray(train_ids).astype(str).tolist())}
    X = np.concatenate([x for x, _ in tables])
    sources = np.concatenate([s for _, s in tables])
    row = np.array([position.get(s, -1) for s in sources.tolist()], dtype=np.intp)
    kept = row >= 0
    views = TrainViews(X[kept], row[kept], recipes[0])
    notes = [f"augmentation bank: {int(kept.sum())} views of {len(np.unique(row[kept]))} train images ({recipes[0].describe()})"]
    if (~kept).any():
        notes.append(f"augmentation bank: {int((~kept).sum())} views of images that are not train rows here left out (val and test never use views)")
    record = {"banks": [str(b.resolve()) for b in banks], **views.record()}
    return views, record, notes


def _read_bank(store: Any, bank: Any, level: str | None, mismatch: Any) -> tuple[AugmentRecipe, np.ndarray, np.ndarray]:
    """(recipe, X of `level`, each row's source image id) of the bank of `store`, every structure checked."""
    where = str(bank.path)
    if bank.being_written():
        raise MedembedError(f"{where}: an extraction is writing this augmentation bank now; wait for it to finish")
    if "augment" not in bank.attrs:
        raise MedembedError(f"{where}: not an augmentation bank (no recipe recorded); move it away or rename it")
    recipe = AugmentRecipe.from_json(bank.attrs["augment"], where)
    try:
        spec = PreprocessSpec.from_dict(json.loads(str(store.attrs.get("preprocess", ""))))
    except (ValueError, TypeError, KeyError, MedembedError):
        raise MedembedError(f"{store.path}: its preprocessing is not a plain spec (a corrupted variant?), so it has no augmentation bank; move {where} away") from None
    expected = dict(store.fingerprint) | {"preprocess_hash": AugmentedPreprocess(spec, recipe).hash()}
    differ = mismatch(expected, bank.fingerprint)
    if differ:
        raise MedembedError(f"{where} is not the augmentation bank of {store.path} or of its recipe (fingerprints differ: {'; '.join(differ)}); re-extract it with --augment")
    try:
        recorded = json.loads(str(bank.attrs.get("source_fingerprint", "")))
    except json.JSONDecodeError:
        recorded = None
    if not isinstance(recorded, dict) or mismatch(dict(store.fingerprint), recorded):
        raise MedembedError(f"{where}: the store fingerprint it records is not {store.path}'s; re-extract the bank with --augment")
    if bank.dim != store.dim:
        raise MedembedError(f"{where}: dim {bank.dim}, but {store.path} has dim {store.dim}")
    table = bank.read()
    for name in (SOURCE_COLUMN, VIEW_COLUMN):
        if name not in table.columns:
            raise MedembedError(f"{where}: the augmentation bank lacks its column {name!r}")
    parsed = [parse_view_id(i) for i in table.image_id.astype(str).tolist()]
    source, view = table.columns[SOURCE_COLUMN].astype(str), table.columns[VIEW_COLUMN].astype(str)
    bad = [k for k, p in enumerate(parsed) if p is None or p[0] != source[k] or str(p[1]) != view[k] or p[1] > recipe.views]
    if bad:
        raise MedembedError(f"{where}: {len(bad)} row(s) are not views 1..{recipe.views} of their source image, e.g. {table.image_id[bad[0]]!r} "
                            f"(source {source[bad[0]]!r}, view {view[bad[0]]!r}); re-extract the bank")
    if level:
        from medembed.store import level_tokens

        X = level_tokens([bank.path], level)
    else:
        X = table.embeddings
    if not np.isfinite(X.astype(np.float32)).reshape(len(X), -1).all():
        raise MedembedError(f"{where}: some views are NaN or infinite; re-extract the bank")
    train = table.columns["split"].astype(str) == "train"
    return recipe, X[train], source[train]


def bank_summary(store_path: Path | str) -> dict[str, Any] | None:
    """What `medembed info` says about the augmentation bank of a store (None when it has none): its path, recipe,
    views per split, the bytes its rows hold (views x (dim + token grids) x dtype size) and the bytes on disk, and
    the problems `check` finds (the same checks `fit` makes before it reads views)."""
    from medembed.store import fingerprint_mismatch, open_store

    path = bank_path(store_path)
    if not path.exists():
        return None
    store = open_store(store_path)
    try:
        bank = open_store(path)
        summary = bank.summary()
    except MedembedError as error:  # not a store at all: say so beside the store's own summary
        return {"path": str(path), "recipe": "(unreadable)", "views_per_image": 0, "views": 0, "train_images": 0, "views_by_split": {},
                "row_bytes": 0, "view_bytes": 0, "bytes_on_disk": path.stat().st_size, "failed": 0, "problems": [str(error)], "readable": False}
    row_bytes = np.dtype(bank.dtype).itemsize * (bank.dim + sum(t * c for t, c in bank.token_shapes.values()))
    views = int(summary["rows"])
    train = int(store.summary()["splits"].get("train", {}).get("rows", 0))
    folder = path.parent / f"{path.name}.segments"
    on_disk = path.stat().st_size + (sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) if folder.is_dir() else 0)
    problems: list[str] = []
    try:
        recipe = _read_bank(store, bank, None, fingerprint_mismatch)[0]
        recipe_text, k = recipe.describe(), recipe.views
    except MedembedError as error:
        problems.append(str(error))
        recipe_text, k = "(unreadable)", 0
    return {
        "path": str(path), "recipe": recipe_text, "views_per_image": k, "views": views, "train_images": train,
        "views_by_split": {name: counts["rows"] for name, counts in summary["splits"].items()},
        "row_bytes": row_bytes, "view_bytes": views * row_bytes, "bytes_on_disk": on_disk, "failed": int(summary["failed"]),
        "problems": problems, "readable": True,
    }


def format_bank(bank: dict[str, Any]) -> list[str]:
    """The `medembed info` lines of `bank_summary`."""
    by_split = ", ".join(f"{name} {rows}" for name, rows in bank["views_by_split"].items()) or "none"
    lines = [
        f"{'views':<12} {bank['path']}: augmentation bank, {bank['recipe']}",
        f"{'':<12} {bank['views']} views ({by_split}; K={bank['views_per_image']} x {bank['train_images']} train images; val and test get none), "
        f"{bank['failed']} failed",
        f"{'':<12} {bank['view_bytes']:,} bytes of rows ({bank['row_bytes']:,} per view: K x the train split's rows), "
        f"{bank['bytes_on_disk']:,} bytes on disk",
    ]
    return lines + [f"{'':<12} problem: {problem}" for problem in bank["problems"]]
