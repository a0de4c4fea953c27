"""Runs on token levels of real EfficientNet-Lite stores (FracAtlas images at 64 px): a deeper adapter (`--head adapter
--level block12`, `--level auto` among adapter levels) and ensembles of token-level members (`fit A.h5 B.h5 --ensemble
mean --head attention --level block14,block19`, an adapter's seeds, several levels of one store). Each run
round-trips through load_run, predict re-extracts the levels and reproduces the run's probabilities, tampered files
and bad level combinations are refused in one line."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from medembed.data.manifest import read_manifest
from medembed.encoders.runtime import build_encoder
from medembed.errors import MedembedError
from medembed.extract.runner import extract
from medembed.fit import fit_run
from medembed.options.extract import ExtractOptions
from medembed.scorers.members import MemberInputs, block_plan
from medembed.runs.inputs import run_inputs
from medembed.runs.record import load_run
from medembed.scorers.options import FitOptions
from tests.cli.test_entry_point import run_cli

LITE0 = {"size": 64, "levels": "block12,block14", "tokens": "1x1"}
LITE1 = {"size": 64, "levels": "block19"}
ATTENTION = {"hidden": 8, "attention": 4, "max_epochs": 2, "n_jobs": 1}
FAST = {"n_resamples": 0}


@pytest.fixture(scope="module")
def stores(tmp_path_factory, small_manifest, fracatlas_root):
    """The small FracAtlas manifest through Lite0 (block12, block14, final@1x1) and Lite1 (block19), at 64 px."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("ensemble-levels")
    paths = []
    for name, options in (("efficientnet-lite0", LITE0), ("efficientnet-lite1", LITE1)):
        path = base / f"{name}.h5"
        extract(read_manifest(small_manifest), fracatlas_root, build_encoder(name, dict(options)), path,
                ExtractOptions(batch_size=8, num_workers=0), encoder_options=options)
        paths.append(path)
    torch.set_num_threads(threads)
    return paths


def predicted_matches_stored(run, tmp_path, small_manifest, fracatlas_root) -> None:
    """`medembed predict` on the run's test images (re-extracted by its encoders, levels included) gives the
    probabilities the run gives its own stored rows."""
    loaded = load_run(run)
    rows = run_inputs(loaded).rows("test")
    stored = dict(zip(rows.image_id, loaded.probabilities(rows)))
    manifest = read_manifest(small_manifest)
    test = manifest.subset(np.flatnonzero((manifest.split == "test") & ~np.isin(manifest.image_id, ["IMG0004028", "IMG0004029"])))
    files = [str(fracatlas_root / path) for path in test.path]
    done = run_cli("predict", run, *files, "--out", tmp_path / "p.csv", "--workers", "0", "--cache-dir", tmp_path / "cache")
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "p.csv", newline="") as handle:
        predicted = {row["image_id"].split("/")[-1]: float(row["probability"]) for row in csv.DictReader(handle)}
    for image_id, path in zip(test.image_id, test.path):
        assert predicted[path.split("/")[-1]] == pytest.approx(stored[image_id], abs=2e-3)


def test_a_block12_adapter_run_through_the_cli_records_its_cost_and_predict_reproduces_it(stores, tmp_path, small_manifest, fracatlas_root):
    lite0, _ = stores
    run = tmp_path / "adapter"
    done = run_cli("fit", lite0, "--head", "adapter", "--level", "block12", "-p", "max_epochs=2", "-p", "batch_size=8", "-p", "n_jobs=1",
                   "--bootstrap", "0", "--out", run)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((run / "run.json").read_text())
    cost = record["details"]["seeds"][0]["selection"]["cost"]
    assert cost["starts_after"] == "block12" and cost["adapts"] == "block13..block15 and the head conv" and cost["input_tokens"] == [5, 192]
    assert record["options"]["head_params"] == {"max_epochs": 2, "batch_size": 8, "n_jobs": 1}
    head = load_run(run).scorer
    assert (head.level, head.encoder, head.encoder_options) == ("block12", "efficientnet-lite0", LITE0)
    predicted_matches_stored(run, tmp_path, small_manifest, fracatlas_root)


def test_level_auto_chooses_among_the_levels_an_adapter_can_start_from(stores, tmp_path):
    lite0, _ = stores
    fit_run([lite0], tmp_path / "auto", FitOptions(head="adapter", level="auto", head_params={"max_epochs": 1, "batch_size": 8, "n_jobs": 1}, **FAST))
    selection = json.loads((tmp_path / "auto" / "run.json").read_text())["details"]["level_selection"]
    assert set(selection["val_auroc"]) == {"block12", "block14"} and selection["chosen"] in ("block12", "block14")
    assert "cannot start from level 'final@1x1'" in selection["skipped"]["final@1x1"]
    assert selection["cost"]["block14"]["adapts"] == "block15 and the head conv"


def test_attention_members_of_two_encoders_levels_fit_load_and_predict(stores, tmp_path, small_manifest, fracatlas_root):
    lite0, lite1 = stores
    run = tmp_path / "attention"
    params = {f"attention.{key}": value for key, value in ATTENTION.items()}
    fit_run([lite0, lite1], run, FitOptions(head="attention", ensemble="mean", level="block14,block19", head_params=params, **FAST))
    record = json.loads((run / "run.json").read_text())
    assert record["kind"] == "ensemble" and record["options"]["level"] == "block14,block19"
    assert record["details"]["member_aurocs"]["reads"] == ["efficientnet-lite0.h5 block14", "efficientnet-lite1.h5 block19"]
    loaded = load_run(run)
    scorer = loaded.scorer
    assert scorer.member_names() == ["attention@0", "attention@1"]
    assert [(b["level"], b["token_shape"], b["encoder"]) for b in scorer.blocks] == [
        ("block14", [5, 192], "efficientnet-lite0"), ("block19", [5, 192], "efficientnet-lite1")]
    rows = run_inputs(loaded).rows("test")
    assert isinstance(rows.X, MemberInputs) and [b.shape[1:] for b in rows.X.blocks] == [(5, 192), (5, 192)]
    assert rows.X.pooled.shape[1] == 2560  # both encoders' pooled vectors, what the OOD reference sees
    predicted_matches_stored(run, tmp_path, small_manifest, fracatlas_root)


def test_an_adapters_seeds_and_two_levels_of_one_store_through_the_cli(stores, tmp_path):
    lite0, _ = stores
    run = tmp_path / "adapters"
    done = run_cli("fit", lite0, "--ensemble", "mean", "--head", "adapter", "--level", "block12,block14", "--ensemble-seeds", "2",
                   "-p", "max_epochs=1", "-p", "batch_size=8", "-p", "n_jobs=1", "--bootstrap", "0", "--out", run)
    assert done.returncode == 0, done.stderr[-2000:]
    scorer = load_run(run).scorer
    assert scorer.member_names() == ["adapter@0#0", "adapter@0#1", "adapter@1#0", "adapter@1#1"]
    assert [(m.level, m.seed) for m in scorer.members_] == [("block12", 0), ("block12", 1), ("block14", 0), ("block14", 1)]
    assert [len(m.network_.tail.blocks) for m in scorer.members_] == [3, 3, 1, 1]  # blocks 13-15, block 15
    selection = json.loads((run / "run.json").read_text())["details"]["seeds"][0]["selection"]
    assert selection["members"][0]["selection"]["cost"]["adapts"] == "block13..block15 and the head conv"
    # tampered: a block's shape, a member of another kind, a block dropped
    for name, change, message in [
        ("shape", lambda d: d["params"]["blocks"][1].update(token_shape=[50, 192]), "member-2 was fitted on 5 features"),
        ("store", lambda d: d["params"]["blocks"][0].update(store=3), "block 0 must hold"),
        ("dropped", lambda d: d["params"].update(blocks=[]), "do not match its params"),
        ("keys", lambda d: d["params"]["blocks"][0].update(code="import os"), "block 0 must hold"),
    ]:
        copy = tmp_path / name
        shutil.copytree(run, copy)
        path = copy / "scorer" / "ensemble.json"
        document = json.loads(path.read_text())
        change(document)
        path.write_text(json.dumps(document))
        with pytest.raises(MedembedError, match=message):
            load_run(copy)
    swapped = tmp_path / "swapped"
    shutil.copytree(run, swapped)
    shutil.rmtree(swapped / "scorer" / "member-3")
    shutil.copytree(run / "scorer" / "member-0", swapped / "scorer" / "member-3")  # block12's adapter where block14's belongs
    with pytest.raises(MedembedError, match="member-3 does not read its block"):
        load_run(swapped)


def test_bad_level_combinations_are_refused_in_one_line(stores, tmp_path):
    lite0, lite1 = stores
    assert block_plan(2, "block14") == [(0, "block14"), (1, "block14")] and block_plan(1, "a,b") == [(0, "a"), (0, "b")]
    assert block_plan(3, "block14,block19,block19") == [(0, "block14"), (1, "block19"), (2, "block19")]  # Lite0, Lite1, Lite2
    with pytest.raises(MedembedError, match="names a level of the store twice"):
        block_plan(1, "block14,block14")
    FitOptions(ensemble="mean", head="adapter", level="block14,block19,block19")  # the options alone do not refuse it
    for stores_given, options, message in [
        ([lite0, lite1], dict(ensemble="mean", head="attention", level="block12,block14,block19"), "names 3 levels for 2 stores"),
        ([lite0, lite1], dict(ensemble="concat", head="attention", level="block14,block19"), "concat joins pooled embeddings"),
        ([lite0, lite1], dict(ensemble="mean", head="attention", level="block14"), "no token level 'block14'"),
        ([lite0], dict(ensemble="mean", head="attention"), "reads a token level; name one with --level"),
        ([lite0], dict(ensemble="mean", head="attention", level="auto"), "auto is not searched"),
    ]:
        with pytest.raises(MedembedError, match=message) as refused:
            fit_run(stores_given, tmp_path / "x", FitOptions(**options, **FAST))
        assert "\n" not in str(refused.value)
    done = run_cli("fit", lite0, "--ensemble", "mean", "--head", "adapter", "--level", "block14,final@1x1", "--bootstrap", "0", "--out", tmp_path / "x")
    assert done.returncode == 2 and "cannot start from level 'final@1x1'" in done.stderr and "Traceback" not in done.stderr, done.stderr[-1500:]
    assert len([line for line in done.stderr.splitlines() if line.startswith("error")]) == 1
