"""Attention maps: grid cells mapped back through pad/stretch exactly, and a token-head run trained on a planted
one-cell marker whose map peaks at the marker's place in the original (non-square) image."""

import base64
import io
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from medembed.data.geometry import Placement, attention_on_image, cell_bounds, cell_boxes
from medembed.data.images import PreprocessSpec
from medembed.fit import fit_run
from medembed.scorers.options import FitOptions
from medembed.store import StoreWriter, make_fingerprint

HEIGHT, WIDTH = 60, 100  # a landscape image: padding adds 20 rows above and below
GRID = (4, 4)
SPEC = PreprocessSpec(size=64, pad_to_square=True, resize="bilinear", antialias=True, mean=(0.5,), std=(0.5,), channels=1)


def test_cells_map_back_through_padding_and_stretching_exactly():
    padded = cell_boxes(Placement.of(HEIGHT, WIDTH, pad_to_square=True), GRID)
    # Square side 100, 20 rows of border on top: row 0 of the grid covers square rows [0, 25) = image rows [-20, 5).
    np.testing.assert_allclose(padded[3], [0, 75, 5, 100])  # row 0, col 3
    np.testing.assert_allclose(padded[4], [5, 0, 30, 25])  # row 1, col 0
    np.testing.assert_allclose(padded[15], [55, 75, 60, 100])  # row 3 ends in the bottom border
    stretched = cell_boxes(Placement.of(HEIGHT, WIDTH, pad_to_square=False), GRID)
    np.testing.assert_allclose(stretched[3], [0, 75, 15, 100])
    np.testing.assert_allclose(stretched[4], [15, 0, 30, 25])
    odd = cell_boxes(Placement.of(61, 100, pad_to_square=True), GRID)  # the odd border row goes below, as in the spec
    np.testing.assert_allclose(odd[0], [0, 0, 6, 25])
    tall = cell_boxes(Placement.of(100, 40, pad_to_square=True), (2, 2))  # 30 columns of border on the left
    np.testing.assert_allclose(tall, [[0, 0, 50, 20], [0, 20, 50, 40], [50, 0, 100, 20], [50, 20, 100, 40]])
    # Adaptive pooling's windows of a 7-wide map into 2 cells overlap: [0, 4/7) and [3/7, 1).
    np.testing.assert_allclose(cell_bounds(2, 7), [[0, 4 / 7], [3 / 7, 1]])


@pytest.mark.parametrize("pad", [True, False])
def test_the_cell_a_spot_lands_in_after_preprocessing_is_the_cell_mapped_back_onto_it(pad):
    # A bright spot inside the box of cell k of the original image, preprocessed as an encoder sees it and pooled
    # to the grid as a level is: cell k is the brightest.
    spec = PreprocessSpec(size=64, pad_to_square=pad, resize="bilinear", antialias=True, mean=(0.5,), std=(0.5,), channels=1)
    boxes = cell_boxes(Placement.of(HEIGHT, WIDTH, pad), GRID)
    for k in (3, 6, 13):
        top, left, bottom, right = boxes[k]
        image = np.zeros((HEIGHT, WIDTH), dtype=np.float32)
        rows, cols = slice(int(top) + 1, int(bottom) - 1), slice(int(left) + 2, int(right) - 2)
        image[rows, cols] = 1.0
        pooled = F.adaptive_avg_pool2d(torch.from_numpy(spec(image))[None], GRID)[0, 0].flatten()
        assert int(pooled.argmax()) == k


def test_a_one_hot_weight_lights_exactly_its_cell_in_the_original_image():
    placement = Placement.of(HEIGHT, WIDTH, pad_to_square=True)
    weights = np.zeros(16)
    weights[6] = 1.0  # row 1, col 2: image rows [5, 30), cols [50, 75)
    heat = attention_on_image(weights, placement, GRID)
    assert heat.shape == (HEIGHT, WIDTH)
    lit = np.argwhere(heat > 0)
    assert lit[:, 0].min() == 5 and lit[:, 0].max() == 29 and lit[:, 1].min() == 50 and lit[:, 1].max() == 74
    small = attention_on_image(weights, placement, GRID, out_shape=(30, 50))  # a half-size thumbnail: pixel i centred at 2i + 1
    lit = np.argwhere(small > 0)
    assert (lit[:, 0].min(), lit[:, 0].max(), lit[:, 1].min(), lit[:, 1].max()) == (2, 14, 25, 36)


def _planted_token_store(tmp_path, n_patients=600):
    """A store of final@4x4 tokens [1 + 16, 8]: abnormal images carry a marker (+6 on channel 0) in one cell
    (cell 6 for every test image), normal ones the same amount spread over all cells. Each id names a real
    60 x 100 PNG under root; the store records SPEC (zero-pad to square) and the root."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    root.mkdir()
    ids, tokens, cols = [], [], {k: [] for k in ("label", "study_id", "patient_id", "body_part", "split")}
    for patient in range(n_patients):
        split = ("train", "train", "train", "val", "test")[patient % 5]
        label = int(rng.random() < 0.5)
        cells = rng.normal(size=(16, 8)).astype(np.float32)
        if label:
            cells[6 if split == "test" else rng.integers(0, 16), 0] += 6.0
        else:
            cells[:, 0] += 6.0 / 16
        ids.append(f"case{patient}")
        tokens.append(np.concatenate([cells.mean(axis=0, keepdims=True), cells]))
        for key, value in (("label", label), ("study_id", f"s{patient}"), ("patient_id", f"p{patient}"), ("body_part", "hand"), ("split", split)):
            cols[key].append(value)
        Image.fromarray((np.linspace(0, 255, WIDTH)[None, :] * np.ones((HEIGHT, 1))).astype(np.uint8)).save(root / f"case{patient}.png")
    tokens = np.asarray(tokens, dtype=np.float32)
    fingerprint = make_fingerprint(encoder="synthetic", model_id="t", embedding_kind="pooled", preprocess_hash=SPEC.hash(), dtype="float32", levels="final@4x4")
    metadata = {"preprocess": SPEC.to_json(), "image_root": str(root)}
    with StoreWriter(tmp_path / "tokens.h5", dim=8, fingerprint=fingerprint, metadata=metadata, tokens={"final@4x4": (17, 8)}) as writer:
        writer.append(ids, tokens[:, 0], cols, tokens={"final@4x4": tokens})
    return tmp_path / "tokens.h5", root


@pytest.fixture(scope="module")
def marker_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("explain")
    store, root = _planted_token_store(tmp)
    params = {"hidden": 32, "attention": 16, "dropout": 0.0, "lr": 5e-3, "max_epochs": 15, "patience": 5, "batch_size": 32, "n_jobs": 1}
    fit_run([store], tmp / "run", FitOptions(head="attention", level="final@4x4", head_params=params, n_resamples=0))
    return tmp / "run", store, root


def test_the_attention_map_of_a_planted_marker_peaks_where_the_marker_is_in_the_original_image(marker_run, tmp_path):
    from medembed.explain import map_file_name, write_attention_maps
    from medembed.protocol.splits import Split
    from medembed.runs.record import load_run
    from medembed.store import open_store

    run_dir, store_path, root = marker_run
    run = load_run(run_dir)
    store = open_store(store_path)
    table = store.read("test")
    rows_of = np.flatnonzero(table.label == 1)
    tokens = store.read_tokens("final@4x4")[np.flatnonzero(store.read().columns["split"] == "test")[rows_of]]
    rows = Split.from_columns(tokens, table.label[rows_of], table.image_id[rows_of], {k: v[rows_of] for k, v in table.columns.items()})
    paths = {image_id: root / f"{image_id}.png" for image_id in rows.image_id}
    summary = write_attention_maps(run, rows, paths, tmp_path / "maps")
    assert not summary.failed and not summary.no_map and len(summary.written) == len(rows.image_id) > 5
    assert {p.name for p in summary.written} == {map_file_name(i) for i in rows.image_id}
    weights = run.scorer.attention_weights(rows.X)
    assert np.mean(np.argmax(weights, axis=1) == 6) > 0.6, "premise: the head attends to the marked cell"
    placement = Placement.of(HEIGHT, WIDTH, pad_to_square=True)
    peaks = [np.unravel_index(np.argmax(attention_on_image(w, placement, GRID)), (HEIGHT, WIDTH)) for w in weights]
    inside = [5 <= r < 30 and 50 <= c < 75 for r, c in peaks]  # cell 6's box in the original 60 x 100 image
    assert np.mean(inside) > 0.6
    with Image.open(summary.written[0]) as image:  # drawn over the image at its own aspect ratio
        assert image.size == (WIDTH, HEIGHT) and image.mode == "RGB"
        drawn = np.asarray(image).astype(int)
    warm = drawn[5:30, 50:75].mean(axis=(0, 1)) - drawn[35:60, 0:25].mean(axis=(0, 1))
    assert warm[0] > 30  # inferno is redder where the weight is


def test_a_token_run_s_report_gallery_shows_its_attention_and_its_record_names_the_level(marker_run):
    run_dir, _, _ = marker_run
    text = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "Thumbnails show the head's attention over the grid cells" in text
    thumbnails = re.findall(r"data:image/jpeg;base64,([^\"]+)", text)
    assert len(thumbnails) >= 6
    with Image.open(io.BytesIO(base64.b64decode(thumbnails[0]))) as image:  # the grey image, coloured by the map
        assert image.mode == "RGB" and image.size == (100, 60)
        pixels = np.asarray(image).astype(int)
    assert np.abs(pixels[..., 0] - pixels[..., 2]).mean() > 10
    assert json.loads((run_dir / "run.json").read_text())["options"]["level"] == "final@4x4"


def test_map_file_names_are_safe_and_distinct():
    from medembed.explain import map_file_name

    names = [map_file_name(i) for i in ("../../etc/passwd", "a/b.png", "a_b.png", "..", "<img src=x>", "")]
    assert len(set(names)) == len(names)
    assert all("/" not in n and not n.startswith(".") and n.endswith(".attention.png") for n in names)
    assert names[0].startswith("etc_passwd-")


def test_a_pooled_head_has_no_map_and_says_so_in_one_line(tmp_path):
    from medembed.explain import write_attention_maps
    from medembed.runs.record import load_run
    from tests.test_fit import write_store

    fit_run([write_store(tmp_path / "s.h5")], tmp_path / "run", FitOptions(n_resamples=0))
    run = load_run(tmp_path / "run")
    summary = write_attention_maps(run, None, {}, tmp_path / "maps")
    assert summary.no_map == "no attention map: a pooled-embedding logreg head gives no weight per image region (only the attention token head does)"
    assert not (tmp_path / "maps").exists()


def test_predict_explain_writes_one_map_per_image_of_real_radiographs(tmp_path, small_manifest, fracatlas_root):
    # Real FracAtlas images: a token store of EfficientNet-Lite0's final map at 2 x 2, an attention run on it, and
    # the installed CLI's predict --explain (the pooled head's one line is test_a_pooled_head_has_no_map...).
    from medembed.data.manifest import read_manifest
    from medembed.encoders.runtime import build_encoder
    from medembed.explain import map_file_name
    from medembed.extract.runner import extract
    from medembed.options.extract import ExtractOptions
    from tests.cli.test_entry_point import run_cli

    options = {"size": 64, "tokens": "2x2"}
    store = tmp_path / "tokens.h5"
    extract(read_manifest(small_manifest), fracatlas_root, build_encoder("efficientnet-lite0", options), store,
            ExtractOptions(batch_size=8, num_workers=0), encoder_options=options)
    params = {"hidden": 8, "attention": 4, "max_epochs": 2, "n_jobs": 1}
    fit_run([store], tmp_path / "attention", FitOptions(head="attention", level="final@2x2", head_params=params, n_resamples=0))
    from medembed.runs.attention import map_geometry
    from medembed.runs.record import load_run

    assert map_geometry(load_run(tmp_path / "attention").record, 5).map_shape == (2, 2)  # the encoder's own final map at 64 px
    manifest = read_manifest(small_manifest)
    files = [fracatlas_root / path for path in manifest.path[manifest.split == "test"][:3]]
    done = run_cli("predict", tmp_path / "attention", *files, "--out", tmp_path / "p.csv", "--explain", tmp_path / "maps", "--workers", "0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"note: --explain: wrote 3 attention maps to {tmp_path / 'maps'}" in done.stderr
    by_name = {map_file_name(f.name): f for f in files}  # images given as files: their ids are their names under their common folder
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == sorted(by_name)
    for path in (tmp_path / "maps").iterdir():
        with Image.open(path) as image, Image.open(by_name[path.name]) as original:
            assert image.mode == "RGB" and max(image.size) <= 512
            assert abs(image.size[0] / image.size[1] - original.size[0] / original.size[1]) < 0.02  # the image's own shape


def test_cells_are_the_adaptive_pooling_windows_of_the_encoder_s_own_feature_map():
    from medembed.runs.attention import MapGeometry, level_map_shape

    assert level_map_shape("efficientnet-lite0", {}, "final") == (7, 7)  # 224 px: from the block definitions
    assert level_map_shape("efficientnet-lite0", {"size": 64}, "block14") == (2, 2)
    assert level_map_shape("no-such-encoder", {}, "final") is None  # equal cells then
    boxes = MapGeometry((4, 4), SPEC, "final@4x4", (7, 7)).boxes(70, 70)
    # 4 cells of a 7-wide map: windows [0, 2), [1, 4), [3, 6), [5, 7) feature-map pixels of 10 image pixels each
    np.testing.assert_allclose(boxes[:4, 1], [0, 10, 30, 50])
    np.testing.assert_allclose(boxes[:4, 3], [20, 40, 60, 70])
    weights = np.zeros(16)
    weights[1] = 1.0
    heat = attention_on_image(weights, Placement.of(70, 70, True), (4, 4), map_shape=(7, 7))
    assert np.flatnonzero(heat[0] > 0).tolist() == list(range(10, 40))  # where cells 0 and 2 overlap it, their mean
    assert heat[0, 15] == pytest.approx(0.5) and heat[0, 25] == pytest.approx(1.0) and heat[0, 35] == pytest.approx(0.5)
