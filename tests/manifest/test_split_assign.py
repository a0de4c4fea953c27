"""`assign_splits` and `medembed manifest split` / `folders --ratios` / `csv --ratios`: properties on generated
manifests of 1 to 100,000 rows (no group in two splits, counts within one group of the ratios, stratified,
deterministic for a seed whatever the row order, existing splits kept), and the entry point as a user runs it."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from medembed.data.manifest import Manifest, ManifestError, assign_splits, read_manifest, write_manifest
from medembed.data.manifest.validate import leakage_problems
from medembed.errors import MedembedError
from medembed.options.manifest import SplitOptions, parse_ratios

SIZES = [1, 2, 3, 10, 97, 1000, 100_000]
MAX_GROUP = 6  # images per patient in the generated manifests: 1..MAX_GROUP
PARTS = ["wrist", "hand", "hip", "elbow", "shoulder"]
MEDEMBED = shutil.which("medembed", path=str(Path(sys.executable).parent)) or shutil.which("medembed")


def generated(n: int, seed: int = 0, grouped: bool = True) -> Manifest:
    """n rows: patients of 1..MAX_GROUP images (or one each), skewed labels and body parts, no split."""
    rng = np.random.default_rng(seed)
    patient = np.repeat(np.arange(n), rng.integers(1, MAX_GROUP + 1, n))[:n] if grouped else np.arange(n)
    ids = np.array([f"img{i:06d}" for i in range(n)], dtype=object)
    return Manifest({
        "image_id": ids,
        "path": ids + ".png",
        "label": rng.choice(["0", "1"], n, p=[0.75, 0.25]),
        "patient_id": np.array([f"p{p:06d}" for p in patient], dtype=object),
        "body_part": rng.choice(PARTS, n, p=[0.4, 0.25, 0.15, 0.15, 0.05]),
    })


def splits_per_group(keys: np.ndarray, split: np.ndarray) -> np.ndarray:
    """[G] how many distinct splits each key's rows lie in."""
    _, key_index = np.unique(keys, return_inverse=True)
    _, split_index = np.unique(split, return_inverse=True)
    pairs = np.unique(key_index.ravel() * 3 + split_index.ravel())
    return np.bincount(pairs // 3)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("ratios", ["70/10/20", "0.6,0.2,0.2", "80/0/20"])
def test_groups_whole_and_counts_within_one_group(n: int, ratios: str) -> None:
    manifest = generated(n, seed=n)
    split = assign_splits(manifest, SplitOptions(ratios=ratios, seed=1)).split
    assert set(split) <= {"train", "val", "test"} and (split != "").all()
    assert (splits_per_group(manifest.patient_id, split) == 1).all()
    for name, share in parse_ratios(ratios).items():
        assert abs(np.sum(split == name) - share * n) <= MAX_GROUP, (name, np.sum(split == name), share * n)
        if share == 0:
            assert not (split == name).any()


@pytest.mark.parametrize("n", SIZES)
def test_singletons_stratified_within_one_row_per_stratum_and_split(n: int) -> None:
    manifest = generated(n, seed=n, grouped=False)
    split = assign_splits(manifest, SplitOptions(ratios="70/10/20", seed=2, stratify="label,body_part")).split
    fractions = parse_ratios("70/10/20")
    stratum = manifest.columns["label"] + "/" + manifest.body_part
    for name, share in fractions.items():
        assert abs(np.sum(split == name) - share * n) < 1, name
        for value in np.unique(stratum):
            rows = stratum == value
            assert abs(np.sum(split[rows] == name) - share * rows.sum()) < 1, (name, value)


def test_grouped_strata_stay_near_their_shares() -> None:
    manifest = generated(20_000, seed=5)
    split = assign_splits(manifest, SplitOptions(seed=0, stratify="body_part")).split
    for part in PARTS:
        rows = manifest.body_part == part
        for name, share in parse_ratios("70/10/20").items():
            # a patient counts in its most frequent part, so a part's share is off by its mixed patients
            assert abs(np.mean(split[rows] == name) - share) < 0.02, (part, name)


@pytest.mark.parametrize("n", [10, 1000, 100_000])
def test_deterministic_for_a_seed_whatever_the_row_order(n: int) -> None:
    manifest = generated(n, seed=3)
    first = assign_splits(manifest, SplitOptions(seed=7)).split
    assert first.tolist() == assign_splits(manifest, SplitOptions(seed=7)).split.tolist()
    order = np.random.default_rng(0).permutation(n)
    shuffled = assign_splits(manifest.subset(order), SplitOptions(seed=7))
    assert shuffled.split.tolist() == first[order].tolist()
    if n >= 1000:
        assert first.tolist() != assign_splits(manifest, SplitOptions(seed=8)).split.tolist()


def test_existing_splits_kept_and_the_rest_dealt_towards_the_ratios() -> None:
    manifest = generated(5000, seed=4)
    patients = np.unique(manifest.patient_id)
    chosen = dict(zip(patients[:300], np.random.default_rng(1).choice(["train", "test"], 300)))
    # a patient's first image already has a split: all its images must follow it
    first_rows = np.unique(manifest.patient_id, return_index=True)[1][:300]
    split = np.full(len(manifest), "", dtype=object)
    split[first_rows] = [chosen[p] for p in manifest.patient_id[first_rows]]
    partly = Manifest({**manifest.columns, "split": split})

    kept = assign_splits(partly, SplitOptions(seed=0))
    assert kept.split[first_rows].tolist() == split[first_rows].tolist()
    in_chosen = np.isin(manifest.patient_id, list(chosen))
    assert kept.split[in_chosen].tolist() == [chosen[p] for p in manifest.patient_id[in_chosen]]
    assert (splits_per_group(manifest.patient_id, kept.split) == 1).all()
    for name, share in parse_ratios("70/10/20").items():
        assert abs(np.sum(kept.split == name) - share * len(manifest)) <= MAX_GROUP

    redone = assign_splits(partly, SplitOptions(seed=0, overwrite=True))
    assert redone.split.tolist() == assign_splits(manifest, SplitOptions(seed=0)).split.tolist()
    complete = assign_splits(kept, SplitOptions(seed=99))
    assert complete == kept  # nothing left to assign: unchanged


def test_rows_of_one_study_stay_together_without_patients() -> None:
    studies = np.repeat([f"s{i}" for i in range(50)], 4)
    manifest = Manifest({"image_id": [f"i{i}" for i in range(200)], "path": [f"{i}.png" for i in range(200)], "study_id": studies})
    split = assign_splits(manifest, SplitOptions(seed=0)).split
    assert (splits_per_group(studies, split) == 1).all()
    assert abs(np.sum(split == "train") - 140) <= 4


def test_patient_and_study_links_are_followed_transitively() -> None:
    # a-b share a study, b-c a patient: one group, though no single column says so
    manifest = Manifest({
        "image_id": ["a", "b", "c", "d"], "path": ["a", "b", "c", "d"],
        "study_id": ["s1", "s1", "s2", "s3"], "patient_id": ["", "p1", "p1", ""],
    })
    for seed in range(20):
        split = assign_splits(manifest, SplitOptions(ratios="50/0/50", seed=seed)).split
        assert len(set(split[:3])) == 1 and leakage_problems(Manifest({**manifest.columns, "split": split})) == []


def test_grouping_by_another_column_that_leaks_patients_is_refused() -> None:
    manifest = Manifest({
        "image_id": [f"i{i}" for i in range(40)], "path": [f"{i}.png" for i in range(40)],
        "patient_id": np.repeat([f"p{i}" for i in range(4)], 10), "site": [f"x{i}" for i in range(40)],
    })
    with pytest.raises(ManifestError, match=r"the splits leak: .*patient.*group by patient_id instead"):
        assign_splits(manifest, SplitOptions(seed=0, group_by="site"))


def test_bad_input_is_one_error_naming_it() -> None:
    manifest = generated(50)
    with pytest.raises(ManifestError, match="no column 'bodypart' to stratify by; the manifest has image_id"):
        assign_splits(manifest, SplitOptions(stratify="label,bodypart"))
    with pytest.raises(ManifestError, match="no column 'patient' to group by"):
        assign_splits(manifest, SplitOptions(group_by="patient"))
    valid = Manifest({**manifest.columns, "split": ["valid"] + [""] * 49})
    with pytest.raises(ManifestError, match="column split must hold train, val, test or nothing; row 1 holds 'valid'"):
        assign_splits(valid, SplitOptions())
    two = np.full(50, "", dtype=object)
    same_patient = np.flatnonzero(manifest.patient_id == manifest.patient_id[0])
    assert len(same_patient) >= 2
    two[same_patient[:2]] = ["train", "test"]
    spanning = Manifest({**manifest.columns, "split": two})
    with pytest.raises(ManifestError, match=r"1 group\(s\) already span splits, e.g. patient_id 'p000000' \(rows 1, 2 in train, test\); .*--overwrite"):
        assign_splits(spanning, SplitOptions())
    assert (assign_splits(spanning, SplitOptions(overwrite=True)).split != "").all()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("70/10", "expected three shares"),
        ("70/10/30", "sum to 110; they must sum to 100"),
        ("0.7,0.1,0.1", "sum to 0.9"),
        ("a/b/c", "not numbers"),
        ("-10/60/50", "non-negative"),
        ("nan/50/50", "finite"),
    ],
)
def test_ratios_that_do_not_parse_or_sum_are_refused(text: str, message: str) -> None:
    with pytest.raises(MedembedError, match=message):
        SplitOptions(ratios=text)


def test_ratios_as_percentages_or_fractions() -> None:
    assert parse_ratios("70/10/20") == pytest.approx({"train": 0.7, "val": 0.1, "test": 0.2})
    assert parse_ratios("0.7,0.1,0.2") == pytest.approx({"train": 0.7, "val": 0.1, "test": 0.2})
    assert parse_ratios("80/0/20") == {"train": 0.8, "val": 0.0, "test": 0.2}
    assert parse_ratios("1/0/0") == {"train": 1.0, "val": 0.0, "test": 0.0}


def test_100k_rows_split_fast() -> None:
    manifest = generated(100_000, seed=11)
    assign_splits(generated(10), SplitOptions())  # imports (scipy) outside the timing
    started = time.perf_counter()
    assign_splits(manifest, SplitOptions(seed=0))
    assert time.perf_counter() - started < 5.0  # about 0.6 s on a 2-core laptop


# --- the entry point, as a user runs it ---


def run_cli(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "400"}
    env.pop("MEDEMBED_DEBUG", None)
    return subprocess.run([MEDEMBED, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def manifest_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("split") / "mine.csv"
    write_manifest(generated(600, seed=2), path)
    return path


def test_split_command_writes_a_grouped_split(manifest_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "split.csv"
    done = run_cli("manifest", "split", manifest_csv, "--ratios", "70/10/20", "--seed", "0", "--stratify", "label,body_part", "--out", out)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out} (600 rows)" in done.stdout and "OK" in done.stdout
    written = read_manifest(out)
    expected = assign_splits(read_manifest(manifest_csv), SplitOptions(seed=0, stratify="label,body_part"))
    assert written == expected
    again = tmp_path / "again.csv"
    assert run_cli("manifest", "split", manifest_csv, "--stratify", "label,body_part", "--out", again).returncode == 0
    assert again.read_bytes() == out.read_bytes()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ratios", "70/20"], "error: ratios '70/20': expected three shares train/val/test"),
        (["--ratios", "60/30/20"], "error: ratios '60/30/20' sum to 110"),
        (["--stratify", "label,bodypart"], "{csv}: no column 'bodypart' to stratify by"),
        (["--group-by", "patient"], "{csv}: no column 'patient' to group by"),
    ],
)
def test_split_command_bad_input_is_one_line(manifest_csv: Path, tmp_path: Path, args: list, message: str) -> None:
    line = one_error_line(run_cli("manifest", "split", manifest_csv, *args, "--out", tmp_path / "x.csv"))
    assert message.format(csv=manifest_csv) in line
    assert not (tmp_path / "x.csv").exists()


def test_split_command_refuses_a_group_spanning_existing_splits(tmp_path: Path) -> None:
    source = tmp_path / "spanning.csv"
    source.write_text("image_id,path,patient_id,split\na,a.png,p1,train\nb,b.png,p1,test\nc,c.png,p2,\n")
    line = one_error_line(run_cli("manifest", "split", source, "--out", tmp_path / "x.csv"))
    assert line == (
        f"error: {source}: 1 group(s) already span splits, e.g. patient_id 'p1' (rows 1, 2 in train, test); "
        "fix the split column or pass --overwrite to reassign every row"
    )
    done = run_cli("manifest", "split", source, "--overwrite", "--out", tmp_path / "x.csv")
    assert done.returncode == 0, done.stderr
    split = read_manifest(tmp_path / "x.csv").split
    assert split[0] == split[1] != ""
    missing = one_error_line(run_cli("manifest", "split", tmp_path / "nope.csv", "--out", tmp_path / "y.csv"))
    assert "nope.csv: no such file" in missing


@pytest.fixture(scope="module")
def xray_folder(tmp_path_factory) -> Path:
    """root/{normal,abnormal}/patientNN_K.png: 40 tiny PNGs."""
    from PIL import Image

    root = tmp_path_factory.mktemp("xrays") / "my_xrays"
    for label, count in (("normal", 28), ("abnormal", 12)):
        (root / label).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((8, 8), i * 5, dtype=np.uint8)).save(root / label / f"{label}{i:02d}.png")
    return root


def test_folders_with_ratios_assigns_splits_in_one_command(xray_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine.csv"
    done = run_cli("manifest", "folders", xray_folder, "--label", "normal=0", "--label", "abnormal=1", "--ratios", "70/10/20", "--out", out)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and "rows without a split" not in done.stdout and "OK" in done.stdout
    manifest = read_manifest(out)
    assert len(manifest) == 40 and manifest.columns["class"][0] in ("normal", "abnormal")
    counts = {name: int(np.sum(manifest.split == name)) for name in ("train", "val", "test")}
    assert counts == {"train": 28, "val": 4, "test": 8}
    abnormal = manifest.label == 1
    assert {name: int(np.sum(manifest.split[abnormal] == name)) for name in counts} in (
        {"train": 8, "val": 1, "test": 3}, {"train": 9, "val": 1, "test": 2}, {"train": 8, "val": 2, "test": 2},
    )
    plain = tmp_path / "plain.csv"
    done = run_cli("manifest", "folders", xray_folder, "--label", "normal=0", "--label", "abnormal=1", "--out", plain)
    assert done.returncode == 0 and "split" not in read_manifest(plain).columns  # no --ratios: no splits, as before
    bad = one_error_line(run_cli("manifest", "folders", xray_folder, "--label", "normal=0", "--label", "abnormal=1", "--ratios", "70/10/21", "--out", plain))
    assert "ratios '70/10/21' sum to 101" in bad


def test_csv_with_ratios_groups_by_the_mapped_patient(tmp_path: Path) -> None:
    source = tmp_path / "labels.csv"
    rows = [f"f{i}.png,P{i // 3},{'abnormal' if i % 4 == 0 else 'normal'}" for i in range(90)]
    source.write_text("file,PatientID,finding\n" + "\n".join(rows) + "\n")
    out = tmp_path / "mine.csv"
    done = run_cli(
        "manifest", "csv", source, "--column", "path=file", "--column", "patient_id=PatientID", "--column", "label=finding",
        "--label-value", "abnormal=1", "--label-value", "normal=0", "--ratios", "0.8,0,0.2", "--seed", "3", "--out", out,
    )
    assert done.returncode == 0, done.stderr
    manifest = read_manifest(out)
    assert set(manifest.split) == {"train", "test"}
    assert (splits_per_group(manifest.patient_id, manifest.split) == 1).all()
    assert abs(np.sum(manifest.split == "test") - 18) <= 3
    line = one_error_line(run_cli("manifest", "csv", source, "--column", "path=file", "--ratios", "80/20/0", "--stratify", "site", "--out", out))
    assert line == f"error: {source}: no column 'site' to stratify by; the manifest has image_id, path, PatientID, finding"
