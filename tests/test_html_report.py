"""report.html: one self-contained page (no external address, data: images only, escaped text) with the metrics,
every figure and a case gallery of real decoded images, opened in a headless browser where one is installed."""

import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from medembed.fit import fit_run
from medembed.scorers.options import FitOptions
from medembed.store import StoreWriter
from tests.test_fit import FP

SCRIPT_ID = '"><script>alert(1)</script>'  # a "/" in it: no such file, shown as an id only
MARKUP = '"><img src=x onerror=alert(1)>'  # part of every test image's id and file name


class _Page(HTMLParser):
    """Every tag with its attributes, and the text, of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def _images_store(tmp_path, root=None):
    """A store of 40 patients x 2 images (a third abnormal) whose ids name real PNGs under root/xrays/ (8- and
    16-bit greyscale, non-square); test ids carry HTML markup, one a script; records root as its image root."""
    rng = np.random.default_rng(0)
    direction = rng.standard_normal(8)
    ids, emb, cols = [], [], {k: [] for k in ("label", "study_id", "patient_id", "body_part", "split")}
    folder = (root or tmp_path / "images") / "xrays"
    folder.mkdir(parents=True)
    for patient in range(40):
        label = (patient // 3) % 3 == 0
        for k in range(2):
            image_id = f"p{patient}_img{k}" + (MARKUP if patient % 3 == 2 else "")
            ids.append(image_id)
            emb.append(rng.standard_normal(8) + 1.0 * label * direction)
            cols["label"].append(int(label))
            cols["study_id"].append(f"p{patient}_s1")
            cols["patient_id"].append(f"p{patient}")
            cols["body_part"].append(("wrist", "elbow")[patient % 2])
            cols["split"].append(("train", "val", "test")[patient % 3])
            gradient = np.linspace(0, 1, 90)[None, :] * np.linspace(0.2, 1, 60)[:, None]
            pixels = Image.fromarray((gradient * 65535).astype(np.uint16)) if k else Image.fromarray((gradient * 255).astype(np.uint8))
            pixels.save(folder / f"{image_id}.png")
    ids[[i for i, c in enumerate(cols["split"]) if c == "test"][0]] = SCRIPT_ID
    with StoreWriter(tmp_path / "s.h5", dim=8, fingerprint=FP, metadata={"image_root": str(root or tmp_path / "images")}) as writer:
        writer.append(ids, np.asarray(emb, dtype=np.float32), cols)
    return tmp_path / "s.h5"


@pytest.fixture(scope="module")
def html_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("html")
    store = _images_store(tmp)
    fit_run([store], tmp / "run", FitOptions(n_resamples=20))
    return tmp / "run"


def test_report_html_is_self_contained_with_escaped_text_and_a_gallery(html_run):
    path = html_run / "report.html"
    page = _parse(path)
    text = path.read_text(encoding="utf-8")
    assert not any(tag in ("script", "link", "iframe", "object", "embed") for tag, _ in page.tags)
    assert not any("onerror" in attrs for _, attrs in page.tags)  # the ids' markup stayed text
    sources = [attrs["src"] for tag, attrs in page.tags if "src" in attrs]
    assert sources and all(src.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for src in sources)
    assert not any("href" in attrs for _, attrs in page.tags)
    assert not re.search(r"url\(|https?://", text.split("<body>")[1])  # nothing fetched from CSS or elsewhere
    figures = sorted(p.name for p in (html_run / "figures").glob("*.png"))
    assert len([s for s in sources if s.startswith("data:image/png")]) == len(figures) == 10
    for src in sources:  # every embedded image decodes
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
            image.load()
    thumbnails = [s for s in sources if s.startswith("data:image/jpeg")]
    assert 6 <= len(thumbnails) <= 18
    joined = "".join(page.text)
    assert "Most confident false positives" in joined and "Borderline: nearest the threshold" in joined
    assert "AUROC" in joined and "path xrays/p" in joined
    assert "<script>" not in text and "<img src=x" not in text
    assert joined.count(MARKUP) >= 6  # shown as text, found as files (their names hold the same markup)


def test_gallery_says_when_the_images_are_not_reachable(tmp_path):
    store = _images_store(tmp_path)
    shutil.rmtree(tmp_path / "images")
    fit_run([store], tmp_path / "run", FitOptions(n_resamples=0))
    page = _parse(tmp_path / "run" / "report.html")
    joined = "".join(page.text)
    assert "is not a folder on this machine" in joined and "image not reachable" in joined
    assert not any(attrs.get("src", "").startswith("data:image/jpeg") for _, attrs in page.tags)


def test_gallery_never_reads_an_image_through_a_link_out_of_the_root(tmp_path):
    from medembed.runs.html import ImageLocator

    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    Image.new("L", (40, 40)).save(outside / "secret.png")
    (root / "secret.png").symlink_to(outside / "secret.png")
    Image.new("L", (40, 40)).save(root / "inside.png")
    locator = ImageLocator(root)
    assert locator.find("secret.png")[0] is None and locator.find("secret")[0] is None
    assert locator.find("../outside/secret.png")[0] is None
    assert locator.find("inside")[0] == root / "inside.png" and locator.find("inside.png")[1] == "inside.png"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium on PATH (.ci/run installs it with apt-get where it can)")
def test_report_html_loads_in_a_headless_browser(html_run, tmp_path):
    browser = [shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    url = (html_run / "report.html").as_uri()
    dom = subprocess.run([*browser, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("data:image/jpeg;base64,") >= 6 and dom.stdout.count("data:image/png;base64,") == 10
    assert "Case gallery" in dom.stdout and "<script>alert" not in dom.stdout
    shot = tmp_path / "shot.png"
    done = subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1200,1600", "--hide-scrollbars", url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as image:
        grey = np.asarray(image.convert("L"))
    assert grey.shape == (1600, 1200) and len(np.unique(grey)) > 20 and grey.std() > 5  # rendered, not blank


def test_an_image_run_s_gallery_follows_its_manifest_paths_inside_the_root(tmp_path):
    from medembed.runs.html import ImageLocator

    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    Image.new("L", (40, 40)).save(root / "a" / "x.png")
    Image.new("L", (40, 40)).save(tmp_path / "outside.png")
    locator = ImageLocator(root, {"one": "a/x.png", "two": "../outside.png", "three": str(tmp_path / "outside.png"), "four": "a/gone.png"})
    assert locator.find("one") == (root / "a" / "x.png", "a/x.png")
    assert locator.find("two") == (None, "its manifest path leads outside the root")
    assert locator.find("three") == (None, "its manifest path leads outside the root")
    assert locator.find("four") == (None, "no such image under the root")


def test_thumbnails_come_from_medembed_s_decoder_dicom_included(tmp_path):
    from medembed.runs.html import thumbnail
    from tests.test_images import _write_dicom

    stored = np.tile(np.linspace(0, 4095, 400), (300, 1)).astype(np.uint16)  # a 12-bit ramp left to right, landscape
    dicom = _write_dicom(tmp_path / "scan.dcm", stored, photometric="MONOCHROME1")  # inverted on decoding
    with Image.open(io.BytesIO(base64.b64decode(thumbnail(dicom)))) as image:
        assert image.format == "JPEG" and image.size == (160, 120) and image.mode == "L"
        pixels = np.asarray(image).astype(int)
    assert pixels[:, :10].mean() > 200 and pixels[:, -10:].mean() < 55  # MONOCHROME1: the high values are dark


def test_a_run_of_several_seeds_shows_its_table_over_seeds(tmp_path):
    from tests.test_fit import write_store

    fit_run([write_store(tmp_path / "s.h5")], tmp_path / "run", FitOptions(head="logreg", seeds=2, n_resamples=10))
    text = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    over = text.split("<h2>Over seeds</h2>")[1].split("<h2>")[0]
    assert "±" in over and "mean ± sd over 2 seeds" in over


def test_evaluate_shows_the_images_under_its_root_and_of_the_stores_it_evaluates(tmp_path):
    from medembed.evaluate import evaluate_run

    store = _images_store(tmp_path)
    fit_run([store], tmp_path / "run", FitOptions(n_resamples=0))
    moved = tmp_path / "moved"
    (tmp_path / "images").rename(moved)  # the store's recorded root is gone; --root names where the images are now

    def thumbnails(evaluation):
        return [a["src"] for _, a in _parse(evaluation / "report.html").tags if a.get("src", "").startswith("data:image/jpeg")]

    evaluate_run(tmp_path / "run", n_resamples=0)
    evaluation = tmp_path / "run" / "evaluations" / "test-bootstrap0"
    assert thumbnails(evaluation) == []
    evaluate_run(tmp_path / "run", n_resamples=0, image_root=moved)
    assert len(thumbnails(evaluation)) >= 6
    other = _images_store(tmp_path / "other")  # --store: the gallery follows that store's recorded root
    evaluate_run(tmp_path / "run", stores=[other], n_resamples=0)
    page = "".join(_parse(tmp_path / "run" / "evaluations" / "test-on-s-bootstrap0" / "report.html").text)
    assert f"images read from {tmp_path / 'other' / 'images'}" in page
