"""A user's own radiographs end to end through the installed `medembed`, offline: the README's "Your own
radiographs" block run as printed there (manifest folders -> extract -> fit -> predict on the manifest) on a
generated tree of real PNG files, then the same prediction as Parquet with an explicit --cache-dir."""

import csv
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO

MEDEMBED = shutil.which("medembed", path=str(Path(sys.executable).parent)) or shutil.which("medembed")
IMAGES_PER_CLASS = 20  # 40 images: each extraction well under 10 s on two idle cores


def readme_commands() -> list[list[str]]:
    """The commands of the first bash block under "### Your own radiographs" in the README (continuation lines
    joined, comments dropped), each as its argument list."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("\n### Your own radiographs\n"):]
    block = section[section.index("```bash\n") + len("```bash\n"):section.index("\n```\n")]
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line) for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def write_tree(root: Path) -> None:
    """my_xrays/normal/ and my_xrays/abnormal/ of 64x64 grey PNGs named like a PACS export (patient, view): noise
    and soft bone-like bands in both; abnormal ones also hold a bright blob, so that the classes are separable."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:64, 0:64]
    for label, folder in ((0, "normal"), (1, "abnormal")):
        (root / folder).mkdir(parents=True)
        for k in range(IMAGES_PER_CLASS):
            pixels = 60 + 25 * np.sin(x / rng.uniform(4, 9)) + rng.normal(0, 12, (64, 64))
            if label:
                cy, cx = rng.integers(16, 48, 2)
                pixels += 150 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * rng.uniform(4, 7) ** 2))
            view = ("ap", "lat")[k % 2]
            name = f"P{label}{k // 2:03d}_{view}.png"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L").save(root / folder / name)


def run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run([MEDEMBED, *args[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"{shlex.join(args)}:\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    return done


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_the_readme_own_data_block_runs_as_printed(tmp_path):
    commands = readme_commands()
    assert [c[:2] for c in commands] == [["medembed", "manifest"], ["medembed", "extract"], ["medembed", "fit"], ["medembed", "predict"]]
    work = tmp_path / "work"
    write_tree(work / "my_xrays")
    # the default cache, $XDG_CACHE_HOME/medembed/predict, kept in tmp_path; no network
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    for name in ("MEDEMBED_DEBUG", "MEDEMBED_CACHE"):
        env.pop(name, None)
    for command in commands[:-1]:
        run(command, work, env)
    before = set(os.listdir(work))
    done = run(commands[-1], work, env)  # medembed predict RUN mine.csv --root my_xrays/ --out predictions.csv
    assert set(os.listdir(work)) - before == {"predictions.csv"}  # no cache store or other file beside --out
    n = 2 * IMAGES_PER_CLASS
    assert f"{n} of {n} images scored" in done.stdout and f"{n} labelled in the manifest ({IMAGES_PER_CLASS} abnormal)" in done.stdout

    manifest = read_rows(work / "mine.csv")
    rows = read_rows(work / "predictions.csv")
    with open(work / "predictions.csv", newline="", encoding="utf-8") as f:
        header = next(csv.reader(f))
    own = ["image_id", "path", "study_id", "probability", "abnormal", "error", "prediction_set", "ood_score", "ood"]
    assert header == own + [name for name in manifest[0] if name not in own]  # every manifest column, after medembed's
    assert {"label", "split", "class"} <= set(header) and len(header) == len(set(header))
    assert [r["image_id"] for r in rows] == [m["image_id"] for m in manifest]
    assert [r["path"] for r in rows] == [m["path"] for m in manifest]  # the manifest's paths as written
    assert [(r["label"], r["split"], r["class"]) for r in rows] == [(m["label"], m["split"], m["class"]) for m in manifest]
    assert all(r["error"] == "" and 0 <= float(r["probability"]) <= 1 for r in rows)
    p = {label: np.array([float(r["probability"]) for r in rows if r["label"] == label]) for label in ("0", "1")}
    assert (p["1"][:, None] > p["0"][None, :]).mean() >= 0.9, p  # AUROC: the blob is found, the classes ranked apart
    cache = tmp_path / "xdg" / "medembed" / "predict"
    stores = list(cache.glob("*/*.embeddings.h5"))
    assert len(stores) == 1 and stores[0].parent.name.startswith("mine-logreg-") and f"embeddings cached in {stores[0].parent}" in done.stderr
    written = stores[0].stat().st_mtime_ns

    # the same as Parquet, the cache named with --cache-dir (the same folder, spelt through a link): reused as it is
    pq = pytest.importorskip("pyarrow.parquet")
    (tmp_path / "cache-link").symlink_to(cache)
    run([*commands[-1][:-2], "--out", "out/predictions.parquet", "--cache-dir", str(tmp_path / "cache-link")], work, env)
    assert sorted(os.listdir(work / "out")) == ["predictions.parquet"]
    assert list(cache.glob("*/*.h5")) == stores and stores[0].stat().st_mtime_ns == written
    table = pq.read_table(work / "out" / "predictions.parquet")
    assert table.schema.names == header
    types = dict(zip(table.schema.names, map(str, table.schema.types)))
    assert (types["probability"], types["abnormal"], types["label"], types["path"]) == ("double", "int64", "int64", "string")
    assert table.column("probability").to_pylist() == pytest.approx([float(r["probability"]) for r in rows], abs=1e-6)
    assert table.column("label").to_pylist() == [int(m["label"]) for m in manifest]

    # a manifest whose paths are not under its folder, and --root for a folder: one line each, exit 2, nothing written
    (work / "elsewhere").mkdir()
    shutil.copy(work / "mine.csv", work / "elsewhere" / "mine.csv")
    first = work / "elsewhere" / manifest[0]["path"]
    for args, message in [
        (["elsewhere/mine.csv"], f"elsewhere/mine.csv: none of its {n} images exists (the first: {first}); "
                                 "its paths are relative to the manifest's folder (give --root DIR for another)"),
        (["my_xrays/", "--root", "my_xrays/"], "--root is the folder a manifest CSV's paths are relative to; "
                                                "image files and folders are scored as given"),
    ]:
        refused = subprocess.run([MEDEMBED, "predict", "runs/mine-logreg", *args, "--out", "refused.csv"], cwd=work, env=env,
                                 capture_output=True, text=True, timeout=120, check=False)
        assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [f"error: {message}"], refused.stderr
        assert not (work / "refused.csv").exists()
