"""report.html: one self-contained page per evaluated split, beside report.md.

Inline CSS, every figure embedded as a base64 PNG, no script and no external address (a Content-Security-Policy
forbids loading anything but data: images). It holds the metrics with their intervals, the per-body-part tables,
every figure of figures/, the run's context and a case gallery: the most confident false positives and false
negatives and the cases nearest the threshold, each with its probability, label, study and path, and a
thumbnail decoded by medembed's own decoder (`medembed.data.images`: DICOM, 16-bit, ...) when the image is
reachable: under the image root the run's store recorded (or one given), found by a containment-checked path.
Token-head runs draw the head's attention over each thumbnail (`medembed.runs.attention`). All text is
HTML-escaped: ids and paths come from files and are not trusted.
"""

from __future__ import annotations

import base64
import io
import os
import warnings
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from medembed._files import atomic_write_text
from medembed.data.images import PreprocessSpec, decode_image
from medembed.data.manifest.table import paths_outside_root
from medembed.errors import MedembedError
from medembed.protocol.report import LEVELS, METRIC_LABELS, BODY_PART_COLUMNS, format_cell

HTML_FILE = "report.html"
GALLERY_SIZE = 6  # cases per gallery section
THUMBNAIL_SIDE = 160  # px, the longer side
MAX_INDEXED_FILES = 500_000  # a root with more files than this is not searched for ids
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".dcm", ".dicom")
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:72rem;padding:0 1rem;color:#222}
h1{font-size:1.5rem}h2{font-size:1.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}th,td{border:1px solid #ccc;padding:.25rem .6rem}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f4f4f4}
.note{color:#555;font-size:.9rem}.figures{display:flex;flex-wrap:wrap;gap:1rem}
figure{margin:0}figure img{width:22rem;border:1px solid #eee}figcaption{font-size:.8rem;color:#555}
.gallery{display:flex;flex-wrap:wrap;gap:.75rem}.case{width:170px;font-size:.75rem;border:1px solid #ddd;padding:4px;word-break:break-all}
.case img{display:block;margin:0 auto 4px auto;max-width:160px;max-height:160px}
.missing{height:80px;background:#f4f4f4;color:#777;display:flex;align-items:center;justify-content:center;text-align:center}
.pos{color:#b00}.neg{color:#06c}
"""
_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@dataclass(frozen=True)
class Case:
    """One row of the gallery."""

    row: int
    image_id: str
    study_id: str
    label: int
    probability: float


def write_html_report(
    directory: Path, record: Any, p: np.ndarray, rows: Any, metrics: dict, *, title: str, context: dict[str, str],
    scorer: Any = None, image_root: Path | None = None,
) -> Path:
    """Write `directory`/report.html for one evaluated split (its `rows`, calibrated `p` [N] and `metrics`);
    figures are read from `directory`/figures. `image_root` overrides the root the run's store recorded;
    `scorer` (the run's) draws attention maps on the thumbnails of token-head runs. Returns the file's path."""
    directory = Path(directory)
    threshold = float(record.image_threshold)
    locator, where = image_locator(record, image_root)
    maps = _MapMaker(record, scorer, rows)
    parts = [f"<h1>{escape(title)}</h1>", _summary_line(record, rows, threshold)]
    parts += _metrics_sections(metrics)
    parts += _figures_section(directory / "figures")
    parts += _gallery_sections(gallery_cases(rows, p, threshold), record, locator, where, maps, threshold)
    parts += ["<h2>Context</h2>", "<table>" + "".join(f"<tr><th>{escape(str(k))}</th><td>{escape(str(v))}</td></tr>" for k, v in context.items() if v != "") + "</table>"]
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{_POLICY}\">"
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )
    path = directory / HTML_FILE
    atomic_write_text(path, page)
    return path


def gallery_cases(rows: Any, p: np.ndarray, threshold: float, size: int = GALLERY_SIZE) -> dict[str, list[Case]]:
    """{section: cases}: false positives (normal, highest p first), false negatives (abnormal, lowest p first)
    and the borderline cases (nearest the threshold, not already shown)."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(rows.y).astype(int)
    called = p >= threshold
    false_pos = np.flatnonzero((y == 0) & called)
    false_neg = np.flatnonzero((y == 1) & ~called)
    # Ties broken by row order, so a report is reproducible.
    false_pos = false_pos[np.argsort(-p[false_pos], kind="stable")][:size]
    false_neg = false_neg[np.argsort(p[false_neg], kind="stable")][:size]
    shown = set(false_pos.tolist()) | set(false_neg.tolist())
    order = np.argsort(np.abs(p - threshold), kind="stable")
    border = [int(i) for i in order if int(i) not in shown][:size]

    def cases(indices: Any) -> list[Case]:
        return [Case(int(i), str(rows.image_id[i]), str(rows.study_id[i]), int(y[i]), float(p[i])) for i in indices]

    return {
        "Most confident false positives": cases(false_pos),
        "Most confident false negatives": cases(false_neg),
        f"Borderline: nearest the threshold {threshold:.3f}": cases(sorted(border, key=lambda i: p[i])),
    }


class ImageLocator:
    """Finds the file of an image id under a root, never outside it: the manifest's path of the id when `paths`
    (id -> relative path, an image run's manifest) holds it, else `root/<id>` when the id is a relative path to an
    image file, else the one image file under root whose name without suffix is the id."""

    def __init__(self, root: Path, paths: dict[str, str] | None = None) -> None:
        self.root = Path(root)
        self._real_root = self.root.resolve()
        self._by_stem: dict[str, list[str]] | None = None
        self._paths = paths or {}

    def find(self, image_id: str) -> tuple[Path | None, str]:
        """(the file, its path relative to the root) or (None, why it was not found)."""
        if image_id in self._paths:
            relative = self._paths[image_id]
            if os.path.isabs(relative) or paths_outside_root([relative])[0] or not self._contained(self.root / relative):
                return None, "its manifest path leads outside the root"
            return (self.root / relative, relative) if (self.root / relative).is_file() else (None, "no such image under the root")
        if image_id and not os.path.isabs(image_id) and not paths_outside_root([image_id])[0]:
            candidate = self.root / image_id
            if candidate.suffix.lower() in _IMAGE_SUFFIXES and self._contained(candidate) and candidate.is_file():
                return candidate, image_id
        matches = self._index().get(image_id, [])
        if len(matches) > 1:
            return None, f"{len(matches)} files under the root are named {image_id}"
        if not matches:
            return None, "no such image under the root"
        return self.root / matches[0], matches[0]

    def _contained(self, path: Path) -> bool:
        return path.resolve().is_relative_to(self._real_root)

    def _index(self) -> dict[str, list[str]]:
        if self._by_stem is None:
            self._by_stem = {}
            seen = 0
            for folder, names, files in os.walk(self.root):  # links to folders are not followed
                names[:] = sorted(name for name in names if not name.startswith("."))
                for name in sorted(files):
                    seen += 1
                    if seen > MAX_INDEXED_FILES:
                        return self._by_stem
                    path = Path(folder) / name
                    if path.suffix.lower() in _IMAGE_SUFFIXES and (not path.is_symlink() or self._contained(path)):
                        self._by_stem.setdefault(path.stem, []).append(str(path.relative_to(self.root)))
        return self._by_stem


def image_locator(record: Any, image_root: Path | None) -> tuple[ImageLocator | None, str]:
    """The locator of the run's images and where they were looked for (or why they were not)."""
    root = image_root
    if root is None:
        root = _recorded_root(record)
        if isinstance(root, str):
            return None, root
    if not Path(root).is_dir():
        return None, f"the image root {root} is not a folder on this machine (medembed evaluate RUN --root DIR shows the images under DIR)"
    return ImageLocator(Path(root), _manifest_paths(record)), f"images read from {root}"


def _manifest_paths(record: Any) -> dict[str, str]:
    """An image run's manifest as id -> path ({} for embedding runs, or a manifest that cannot be read)."""
    if "manifest" not in record.inputs:
        return {}
    from medembed.data.manifest import read_manifest

    try:
        manifest = read_manifest(Path(record.inputs["manifest"]))
    except (MedembedError, OSError):
        return {}
    return dict(zip(manifest.image_id.tolist(), manifest.path.tolist()))


def _recorded_root(record: Any) -> Path | str:
    """The image root a run's inputs recorded, or a sentence saying why there is none."""
    if "image_root" in record.inputs:
        return Path(record.inputs["image_root"])
    stores = record.inputs.get("stores") or []
    if not stores:
        return "the run records no image root"
    from medembed.store import open_store

    try:
        root = open_store(stores[0]).attrs.get("image_root")
    except MedembedError as error:
        return f"the run's store cannot be opened ({error})"
    if not isinstance(root, str) or not root:
        return f"the store {stores[0]} records no image root"
    return Path(root)


class _MapMaker:
    """Attention overlays of a token-head run's rows (nothing for other runs)."""

    def __init__(self, record: Any, scorer: Any, rows: Any) -> None:
        self.geometry = None
        self.note = ""
        self.rows = rows
        self.scorer = scorer
        self._weights: dict[int, np.ndarray] = {}
        X = getattr(rows, "X", None)
        if scorer is None or X is None or np.ndim(X) != 3:
            return
        from medembed.runs.attention import map_geometry, no_map_reason

        self.note = no_map_reason(record, scorer)
        if not self.note:
            try:
                self.geometry = map_geometry(record, int(np.shape(X)[1]))
            except MedembedError as error:
                self.note = str(error)

    def prepare(self, rows: list[int]) -> None:
        """Compute the weights of these rows in one pass of the head (the gallery's cases)."""
        self._weights = {}
        if self.geometry is not None and rows:
            order = sorted(set(rows))
            self._weights = dict(zip(order, self.scorer.attention_weights(np.asarray(self.rows.X[order]))))

    def weights(self, row: int) -> np.ndarray | None:
        if self.geometry is None:
            return None
        if row not in self._weights:
            self.prepare([row])
        return self._weights[row]


def _summary_line(record: Any, rows: Any, threshold: float) -> str:
    n, n_pos = len(rows.y), int(np.sum(rows.y))
    encoder = record.fingerprint.get("encoder", "")
    model = escape(record.scorer) + (f" on {escape(encoder)}" if encoder else "")
    return f"<p class=\"note\">{model} · {n} images ({n_pos} abnormal) · image threshold {threshold:.3f}</p>"


def _metrics_sections(metrics: dict) -> list[str]:
    """The headline table (and, for a run of several seeds, the one over seeds) and the per-body-part tables."""
    levels = [level for level in LEVELS if level in metrics]
    out = ["<h2>Metrics</h2>", *_headline(metrics, levels)]
    over_seeds = metrics.get("over_seeds")
    if isinstance(over_seeds, dict) and all(isinstance(over_seeds.get(level), dict) and "overall" in over_seeds[level] for level in levels):
        out += ["<h2>Over seeds</h2>", *_headline(over_seeds, levels)]
    for level in levels:
        by_part = metrics[level].get("by_body_part") or {}
        if by_part:
            out.append(f"<h2>Per body part, {level} level</h2>")
            head = "".join(f"<th>{escape(METRIC_LABELS[m])}</th>" for m in BODY_PART_COLUMNS)
            lines = "".join(
                f"<tr><th>{escape(str(part))}</th>" + "".join(f"<td class=\"n\">{escape(format_cell(table.get(m), m))}</td>" for m in BODY_PART_COLUMNS) + "</tr>"
                for part, table in by_part.items()
            )
            out.append(f"<table><tr><th>Body part</th>{head}</tr>{lines}</table>")
    return out


def _headline(metrics: dict, levels: list[str]) -> list[str]:
    header = "".join(f"<th>{level.capitalize()} level</th>" for level in levels)
    body = ""
    for metric, label in METRIC_LABELS.items():
        if any(metric in metrics[level]["overall"] for level in levels):
            cells = "".join(f"<td class=\"n\">{escape(format_cell(metrics[level]['overall'].get(metric), metric))}</td>" for level in levels)
            body += f"<tr><th>{escape(label)}</th>{cells}</tr>"
    return [f"<table><tr><th>Metric</th>{header}</tr>{body}</table>", f"<p class=\"note\">{escape(_interval_note(metrics, levels))}</p>"]


def _interval_note(metrics: dict, levels: list[str]) -> str:
    first = next(iter(metrics[levels[0]]["overall"].values()), {})
    if isinstance(first, dict) and "mean" in first:
        return f"Values: mean ± sd over {first.get('n_seeds')} seeds."
    bootstrap = metrics[levels[0]].get("bootstrap") or {}
    if not bootstrap.get("n_resamples"):
        return "Values: point estimates (no bootstrap)."
    confidence = round(100 * (1 - float(bootstrap.get("alpha", 0.05))))
    unit = str(bootstrap.get("unit", "image"))
    units = "studies" if unit == "study" else f"{unit}s"
    return f"Values: point estimate and {confidence}% percentile bootstrap interval ({bootstrap['n_resamples']} resamples of {units})."


def _figures_section(folder: Path) -> list[str]:
    out = ["<h2>Figures</h2>"]
    pngs = sorted(folder.glob("*.png"), key=_figure_order) if folder.is_dir() else []
    if not pngs:
        return out + ["<p class=\"note\">No figures were drawn.</p>"]
    items = []
    for png in pngs:
        if png.is_symlink() or not png.is_file():
            continue  # the run's own files only
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        vector = " (PDF beside it)" if png.with_suffix(".pdf").is_file() else ""
        items.append(f"<figure><img alt=\"{escape(png.stem)}\" src=\"data:image/png;base64,{data}\"><figcaption>figures/{escape(png.name)}{vector}</figcaption></figure>")
    return out + ["<div class=\"figures\">" + "".join(items) + "</div>"]


_FIGURE_KINDS = ("roc", "pr", "reliability", "thresholds", "body_parts")


def _figure_order(png: Path) -> tuple[int, int, str]:
    """Image level before study level, each as ROC, PR, reliability, thresholds, body parts; others after."""
    kind, _, level = png.stem.rpartition("_")
    known = kind in _FIGURE_KINDS and level in LEVELS
    return (LEVELS.index(level) if known else len(LEVELS), _FIGURE_KINDS.index(kind) if known else 0, png.name)


def _gallery_sections(cases: dict[str, list[Case]], record: Any, locator: ImageLocator | None, where: str, maps: _MapMaker,
                      threshold: float) -> list[str]:
    out = ["<h2>Case gallery</h2>", f"<p class=\"note\">Image level, threshold {threshold:.3f}; {escape(where)}."
           + (" Thumbnails show the head's attention over the grid cells (inferno: more weight), placed through the run's preprocessing." if maps.geometry else "")
           + (f" {escape(maps.note)}." if maps.note else "") + "</p>"]
    spec = _spec(record)
    maps.prepare([case.row for section in cases.values() for case in section])
    for heading, section in cases.items():
        out.append(f"<h3>{escape(heading)}</h3>")
        if not section:
            out.append("<p class=\"note\">None.</p>")
            continue
        out.append("<div class=\"gallery\">" + "".join(_case_card(case, locator, maps, spec) for case in section) + "</div>")
    return out


def _spec(record: Any) -> PreprocessSpec | None:
    """The run's preprocessing, whose decoding settings (limits, JPEG draft) the thumbnails are decoded with."""
    import json

    try:
        return PreprocessSpec.from_dict(json.loads(record.preprocess)) if record.preprocess else None
    except (MedembedError, TypeError, ValueError, KeyError):
        return None


def _case_card(case: Case, locator: ImageLocator | None, maps: _MapMaker, spec: PreprocessSpec | None) -> str:
    path_text, picture = "", "<div class=\"missing\">image not reachable</div>"
    if locator is not None:
        path, relative = locator.find(case.image_id)
        if path is None:
            picture = f"<div class=\"missing\">{escape(relative)}</div>"
        else:
            path_text = relative
            try:
                picture = f"<img alt=\"{escape(case.image_id)}\" src=\"data:image/jpeg;base64,{thumbnail(path, spec, maps.weights(case.row), maps.geometry)}\">"
            except (MedembedError, OSError, ValueError) as error:
                picture = f"<div class=\"missing\">not decoded: {escape(str(error)[:120])}</div>"
    label = "<span class=\"pos\">abnormal</span>" if case.label else "<span class=\"neg\">normal</span>"
    return (
        f"<div class=\"case\">{picture}<b>p = {case.probability:.3f}</b> · label {label}<br>"
        f"id {escape(case.image_id)}<br>study {escape(case.study_id)}"
        + (f"<br>path {escape(path_text)}" if path_text else "") + "</div>"
    )


def thumbnail(path: Path, spec: PreprocessSpec | None = None, weights: np.ndarray | None = None, geometry: Any = None,
              side: int = THUMBNAIL_SIDE) -> str:
    """Base64 JPEG of the image at `path`, decoded by medembed's decoder (`spec`'s limits when given), its longer
    side `side` px; with `weights` and `geometry`, the attention overlay of `medembed.runs.attention`."""
    from PIL import Image

    pixels = spec.decode(path) if spec is not None else decode_image(path)
    original = pixels.shape[:2]
    image = Image.fromarray(np.clip(np.rint(pixels * 255), 0, 255).astype(np.uint8))
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    if weights is not None and geometry is not None:
        from medembed.runs.attention import overlay

        image = Image.fromarray(overlay(np.asarray(image, dtype=np.float64) / 255, weights, geometry, original))
    buffer = io.BytesIO()
    image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode).save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def write_html_report_safely(*args: Any, **kwargs: Any) -> Path | None:
    """write_html_report, but a report that cannot be written is a warning: it never fails the run."""
    from medembed.protocol.figures import FigureWarning

    try:
        return write_html_report(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - report.html is a by-product, as the figures are
        warnings.warn(f"{Path(args[0]) / HTML_FILE}: not written ({type(error).__name__}: {error})", FigureWarning, stacklevel=2)
        return None
