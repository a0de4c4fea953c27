"""The augmentation bank (extract --augment K): seeded views of train images beside the store, and fit drawing them.

Real FracAtlas images (26-row subset), EfficientNet-Lite0's real weights at 64 px."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from medembed.data.augment import SOURCE_COLUMN, AugmentedPreprocess, AugmentRecipe, parse_view_id, view_id
from medembed.store.views import TrainViews, bank_path, load_train_views
from medembed.data.manifest import read_manifest
from medembed.encoders.runtime import build_encoder
from medembed.errors import MedembedError
from medembed.extract.runner import extract, extract_bank
from medembed.options.augment import AugmentOptions
from medembed.options.extract import ExtractOptions
from medembed.protocol.splits import load_splits
from medembed.scorers.heads import make_head
from medembed.store import open_store

from tests.conftest import REPO, kill_after_batches

ENCODER = {"size": 64}
OPTIONS = ExtractOptions(batch_size=4, num_workers=0)
K = 2
MEDEMBED = Path(sys.executable).parent / "medembed"  # the installed entry point


def encoder():
    return build_encoder("efficientnet-lite0", dict(ENCODER))


@pytest.fixture(scope="module")
def banked(tmp_path_factory, small_manifest, fracatlas_root) -> Path:
    """A store of the 26-row subset and its bank of K views per train image, extracted in-process, uninterrupted."""
    out = tmp_path_factory.mktemp("banked") / "s.h5"
    manifest = read_manifest(small_manifest)
    built = encoder()
    extract(manifest, fracatlas_root, built, out, OPTIONS, encoder_options=ENCODER)
    summary = extract_bank(manifest, fracatlas_root, built, out, OPTIONS, AugmentOptions(augment=K), encoder_options=ENCODER)
    assert summary.run.total == K * int((manifest.split == "train").sum())
    assert f"{summary.run.done} view(s) embedded" in summary.format()
    return out


def test_views_are_seeded_and_differ_from_the_original(small_manifest, fracatlas_root):
    manifest = read_manifest(small_manifest)
    path, image_id = fracatlas_root / manifest.path[0], str(manifest.image_id[0])
    spec = encoder().preprocess
    views = AugmentedPreprocess(spec, AugmentRecipe.from_options(AugmentOptions(augment=3)))
    first, again = views.load_view(path, image_id, 1), views.load_view(path, image_id, 1)
    np.testing.assert_array_equal(first, again)  # a function of (image id, view, seed) only
    original = spec.load(path)
    assert first.shape == original.shape and first.dtype == np.float32
    assert not np.allclose(first, original, atol=1e-3)
    assert not np.allclose(first, views.load_view(path, image_id, 2), atol=1e-3)
    other_seed = AugmentedPreprocess(spec, AugmentRecipe.from_options(AugmentOptions(augment=3, augment_seed=1)))
    assert not np.allclose(first, other_seed.load_view(path, image_id, 1), atol=1e-3)
    assert other_seed.hash() != views.hash() != spec.hash()
    # a recipe of no-ops gives the original back
    identity = AugmentRecipe.from_options(AugmentOptions(augment=1, crop_scale=1.0, crop_ratio=1.0, flip=0.0, rotate=0.0, brightness=0.0, contrast=0.0))
    np.testing.assert_allclose(AugmentedPreprocess(spec, identity).load_view(path, image_id, 1), original, atol=1e-5)


def test_view_ids_round_trip_and_bad_options_are_refused():
    assert parse_view_id(view_id("a#view1", 2)) == ("a#view1", 2)
    assert parse_view_id("IMG0001") is None and parse_view_id("x#view0") is None
    for bad in ({"augment": -1}, {"augment": 65}, {"flip": 1.5}, {"rotate": 90.0}, {"crop_scale": 0.0}, {"contrast": float("nan")}):
        with pytest.raises(MedembedError, match="option"):
            AugmentOptions(**bad)


def test_bank_holds_views_of_train_images_only_and_the_store_is_unchanged(banked, small_manifest):
    manifest = read_manifest(small_manifest)
    main, bank = open_store(banked), open_store(bank_path(banked))
    assert "augment" not in main.attrs  # the main store is what it is without --augment
    assert json.loads(str(bank.attrs["source_fingerprint"])) == main.fingerprint
    assert bank.fingerprint["preprocess_hash"] != main.fingerprint["preprocess_hash"]
    assert {k: v for k, v in bank.fingerprint.items() if k != "preprocess_hash"} == {k: v for k, v in main.fingerprint.items() if k != "preprocess_hash"}
    table = bank.read()
    train = set(manifest.image_id[manifest.split == "train"].tolist())
    assert set(table.columns[SOURCE_COLUMN].tolist()) <= train and set(table.columns["split"].tolist()) == {"train"}
    stored = set(main.image_ids()) & train
    assert len(table) == K * len(stored)
    # a view's embedding is not its original's
    rows = main.read()
    original = dict(zip(rows.image_id.tolist(), rows.embeddings.astype(np.float32)))
    for image_id, vector in zip(table.columns[SOURCE_COLUMN].tolist(), table.embeddings.astype(np.float32)):
        assert np.abs(vector - original[image_id]).max() > 1e-2
    assert main.verify() == [] and bank.verify() == []


def test_cli_bank_resumes_after_sigkill_to_the_same_views_and_refuses_another_recipe(tmp_path, banked, small_manifest, fracatlas_root):
    out = tmp_path / "killed.h5"
    args = [str(MEDEMBED), "extract", str(small_manifest), "--root", str(fracatlas_root), "--encoder", "efficientnet-lite0",
            "--option", "size=64", "--out", str(out), "--batch-size", "2", "--workers", "0", "--augment", str(K)]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_after_batches(proc, bank_path(out), batches=2, timeout=240)
    partial = len(open_store(bank_path(out)))
    assert 0 < partial < len(open_store(bank_path(banked))), "the kill did not land in the views run"
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "augmentation bank" in done.stdout and "val and test get no views" in done.stdout
    resumed, reference = (open_store(bank_path(p)).read() for p in (out, banked))
    resumed, reference = (t.subset(np.argsort(t.image_id.astype(str))) for t in (resumed, reference))
    assert resumed.image_id.tolist() == reference.image_id.tolist()
    np.testing.assert_allclose(resumed.embeddings.astype(np.float32), reference.embeddings.astype(np.float32), rtol=2e-3, atol=2e-3)

    another = subprocess.run(args[:-1] + ["3"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert another.returncode == 2 and "another recipe" in another.stderr and "Traceback" not in another.stderr
    assert len(another.stderr.strip().splitlines()) == 1
    bad = subprocess.run(args + ["--aug-flip", "2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "flip" in bad.stderr and "Traceback" not in bad.stderr

    shown = subprocess.run([str(MEDEMBED), "info", str(out), "--verify"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert f"K={K} x" in shown.stdout and "bytes of rows" in shown.stdout and "verify       OK" in shown.stdout
    as_json = json.loads(subprocess.run([str(MEDEMBED), "info", str(out), "--json"], cwd=REPO, capture_output=True, text=True, timeout=300).stdout)
    bank = as_json["augmentation_bank"]
    assert bank["views"] == len(reference) and bank["view_bytes"] == len(reference) * 1280 * 2 and bank["problems"] == []


def test_fit_reads_train_views_and_refuses_mixed_or_tampered_banks(tmp_path, banked, small_manifest, fracatlas_root):
    splits, _, _ = load_splits([banked])
    views, record, notes = load_train_views([banked], splits["train"].image_id, None)
    assert views is not None and record["views"] == len(views.X) and "augmentation bank" in notes[0]
    assert set(views.row.tolist()) == set(range(len(splits["train"])))
    # views of images that are not train rows here are left out: val and test never see one
    fewer, _, fewer_notes = load_train_views([banked], splits["train"].image_id[1:], None)
    assert len(fewer.X) == len(views.X) - K and "left out" in fewer_notes[-1]
    # shards: one with a bank and one without, or banks of two recipes, are refused in one line
    copy = tmp_path / "copy.h5"
    shutil.copy(banked, copy)
    with pytest.raises(MedembedError, match="with and without an augmentation bank"):
        load_train_views([banked, copy], splits["train"].image_id, None)
    shutil.copy(bank_path(banked), bank_path(copy))
    with h5py.File(bank_path(copy), "r+") as f:  # a tampered recipe no longer matches the bank's fingerprint
        recipe = json.loads(f.attrs["augment"])
        f.attrs["augment"] = json.dumps(recipe | {"rotate": 20.0})
    with pytest.raises(MedembedError, match="fingerprints differ"):
        load_train_views([copy], splits["train"].image_id, None)
    shown = subprocess.run([str(MEDEMBED), "info", str(copy), "--verify"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 1 and "fingerprints differ" in shown.stderr
    bank_bytes = bank_path(copy).read_bytes()
    bank_path(copy).write_bytes(b"not hdf5")  # a bank that is not a store: info still shows the store, --verify fails
    shown = subprocess.run([str(MEDEMBED), "info", str(copy), "--verify"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 1 and "rows" in shown.stdout and "copy.views.h5" in shown.stderr and "Traceback" not in shown.stderr
    bank_path(copy).write_bytes(bank_bytes)
    with h5py.File(bank_path(copy), "r+") as f:
        f.attrs["augment"] = "[1, 2]"
    with pytest.raises(MedembedError, match="recipe has keys"):
        load_train_views([copy], splits["train"].image_id, None)
    bank_path(copy).unlink()
    extract_bank(read_manifest(small_manifest), fracatlas_root, encoder(), copy, OPTIONS, AugmentOptions(augment=1), encoder_options=ENCODER)
    with pytest.raises(MedembedError, match="different recipes"):
        load_train_views([banked, copy], splits["train"].image_id, None)


def test_mlp_draws_one_view_per_image_per_epoch(banked):
    splits, _, _ = load_splits([banked])
    train, val = splits["train"], splits["val"]
    views, _, _ = load_train_views([banked], train.image_id, None)
    chosen = np.stack([views.draw(len(train), np.random.default_rng(seed)) for seed in range(200)])
    for row in range(len(train)):  # each row draws its original or one of its own views, and every one of them
        own = {row} | {len(train) + m for m in np.flatnonzero(views.row == row)}
        assert set(chosen[:, row].tolist()) == own
    params = {"max_epochs": 4, "patience": 4, "hidden": [16]}
    plain = make_head("mlp", seed=0, **params).fit(train.X, train.y, eval_set=[(val.X, val.y)])
    augmented = make_head("mlp", seed=0, **params).fit(train.X, train.y, eval_set=[(val.X, val.y)], views=views)
    again = make_head("mlp", seed=0, **params).fit(train.X, train.y, eval_set=[(val.X, val.y)], views=views)
    assert augmented.selection_["train_loss"] == again.selection_["train_loss"]  # seeded
    assert augmented.selection_["train_loss"] != plain.selection_["train_loss"]  # the views were trained on
    assert augmented.selection_["views"]["views"] == len(views.X)
    with pytest.raises(MedembedError, match="views of shape"):
        make_head("mlp", seed=0, **params).fit(train.X, train.y, eval_set=[(val.X, val.y)], views=TrainViews(views.X[:, :10], views.row, views.recipe))


@pytest.mark.filterwarnings("ignore:the val split is small")
def test_fit_run_records_the_bank_and_other_heads_say_they_do_not_use_it(tmp_path, banked):
    from medembed.fit import fit_run
    from medembed.scorers.options import FitOptions

    fit_run([banked], tmp_path / "mlp", FitOptions(head="mlp", head_params={"max_epochs": 3, "hidden": [16]}))
    run = json.loads((tmp_path / "mlp" / "run.json").read_text())
    assert run["details"]["augmentation"]["used"] is True and run["details"]["augmentation"]["recipe"]["views"] == K
    assert any(note.startswith("augmentation bank:") for note in run["notes"])
    fit_run([banked], tmp_path / "off", FitOptions(head="mlp", head_params={"max_epochs": 3, "hidden": [16]}, augment_bank=False))
    run = json.loads((tmp_path / "off" / "run.json").read_text())
    assert "augmentation" not in run["details"] and any("--no-augment-bank" in note for note in run["notes"])
    fit_run([banked], tmp_path / "logreg", FitOptions(head="logreg"))
    run = json.loads((tmp_path / "logreg" / "run.json").read_text())
    assert run["details"]["augmentation"]["used"] is False
    assert any("augmentation bank not used: head logreg" in note for note in run["notes"])


@pytest.mark.filterwarnings("ignore:the val split is small")
def test_attention_and_adapter_heads_draw_views_of_a_token_level(tmp_path, small_manifest, fracatlas_root):
    from medembed.fit import choose_level, fit_run
    from medembed.scorers.options import FitOptions

    options = {"size": 64, "levels": "block14"}
    out = tmp_path / "tokens.h5"
    built, manifest = build_encoder("efficientnet-lite0", options), read_manifest(small_manifest)
    extract(manifest, fracatlas_root, built, out, OPTIONS, encoder_options=options)
    extract_bank(manifest, fracatlas_root, built, out, OPTIONS, AugmentOptions(augment=1), encoder_options=options)
    assert open_store(bank_path(out)).token_shapes == open_store(out).token_shapes
    splits, _, _ = load_splits([out], level="block14")
    views, _, _ = load_train_views([out], splits["train"].image_id, "block14")
    assert views.X.shape[1:] == splits["train"].X.shape[1:]
    params = {"max_epochs": 3, "patience": 3}
    train, val = splits["train"], splits["val"]
    plain = make_head("attention", seed=0, **params).fit(train.X, train.y, eval_set=[(val.X, val.y)])
    drawn = make_head("attention", seed=0, **params).fit(train.X, train.y, eval_set=[(val.X, val.y)], views=views)
    assert drawn.selection_["train_loss"] != plain.selection_["train_loss"] and drawn.selection_["views"]["views"] == len(views.X)
    for head in ("attention", "adapter"):
        fit_run([out], tmp_path / head, FitOptions(head=head, level="block14", head_params={"max_epochs": 2}))
        run = json.loads((tmp_path / head / "run.json").read_text())
        assert run["details"]["augmentation"]["used"] is True, head
        assert run["details"]["seeds"][0]["selection"]["views"]["views"] == len(views.X)
    auto = FitOptions(head="attention", level="auto", head_params={"max_epochs": 2})  # each level tried as the run trains it
    assert choose_level([out], auto)[1]["augmentation_bank"] == ["block14"]
    assert "augmentation_bank" not in choose_level([out], replace(auto, augment_bank=False))[1]


def test_bank_refusals_before_any_view_is_embedded(tmp_path, banked, small_manifest, fracatlas_root):
    manifest = read_manifest(small_manifest)
    with pytest.raises(MedembedError, match="no store to augment"):
        extract_bank(manifest, fracatlas_root, encoder(), tmp_path / "none.h5", OPTIONS, AugmentOptions(augment=1))
    with pytest.raises(MedembedError, match="another recipe"):
        extract_bank(manifest, fracatlas_root, encoder(), banked, OPTIONS, AugmentOptions(augment=K, rotate=5.0))
    with pytest.raises(MedembedError, match="another encoder, preprocessing or precision"):
        extract_bank(manifest, fracatlas_root, build_encoder("efficientnet-lite0", {"size": 96}), banked, OPTIONS, AugmentOptions(augment=K))


def test_torchrun_two_processes_write_the_bank_one_process_writes(tmp_path, banked, small_manifest, fracatlas_root):
    from tests.test_extract import assert_same_embeddings, torchrun_extract

    out = tmp_path / "dist.h5"
    done = torchrun_extract(out, small_manifest, fracatlas_root, "--workers", "0", "--device", "cpu", "--augment", str(K), port=29521)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(tmp_path.glob("*.rank*")), "the shard stores of the store and of its bank are merged and removed"
    bank, reference = open_store(bank_path(out)), open_store(bank_path(banked))
    assert bank.attrs["augment"] == reference.attrs["augment"] and bank.attrs["source_store"] == "dist.h5"
    assert set(bank.failed()) == set(reference.failed())
    assert_same_embeddings(bank.read(), reference.read())
    train = load_splits([out])[0]["train"]
    assert len(load_train_views([out], train.image_id, None)[0].X) == len(bank.read().image_id)  # fit draws from it


def test_train_views_subset_keeps_the_views_of_its_rows_counted_within_it():
    recipe = AugmentRecipe.from_options(AugmentOptions(augment=2))
    views = TrainViews(np.arange(6, dtype=np.float32).reshape(6, 1), np.array([0, 0, 1, 2, 2, 3]), recipe)
    part = views.subset(np.array([3, 1]))  # row 3 becomes row 0, row 1 row 1; the views of rows 0 and 2 are dropped
    assert part.row.tolist() == [1, 0] and part.X[:, 0].tolist() == [2.0, 5.0] and part.recipe == recipe
    part.check(2, (1,))
    mask = views.subset(np.array([False, False, True, True, True]))  # a mask: rows 2, 3, 4 -> 0, 1, 2 (row 4 has none)
    assert mask.row.tolist() == [0, 0, 1] and mask.X[:, 0].tolist() == [3.0, 4.0, 5.0]
    assert len(views.subset(np.array([], dtype=int)).X) == 0
    with pytest.raises(MedembedError, match="distinct"):
        views.subset(np.array([1, 1]))


@pytest.fixture(scope="module")
def bankless(tmp_path_factory, banked) -> Path:
    """A second "encoder's" store of the same images without a bank: the banked store's rows, their vectors' first
    half under another fingerprint (cheaper than a second extraction; a view misrouted to it could not fit)."""
    from medembed.store import StoreWriter

    table = open_store(banked).read()
    half = table.embeddings.shape[1] // 2
    out = tmp_path_factory.mktemp("bankless") / "half.h5"
    columns = {name: table.columns[name] for name in ("label", "study_id", "patient_id", "body_part", "split")}
    with StoreWriter(out, dim=half, fingerprint={**open_store(banked).fingerprint, "encoder": "half-of-lite0"}) as writer:
        writer.append(table.image_id.tolist(), table.embeddings[:, :half], columns)
    return out


def _member_selections(run_dir: Path) -> dict[str, dict]:
    run = json.loads((run_dir / "run.json").read_text())
    return {m["member"]: m["selection"] for m in run["details"]["seeds"][0]["selection"]["members"]}


MEMBER_MLP = {"max_epochs": 3, "hidden": [16]}


@pytest.mark.filterwarnings("ignore:the val split is small")
def test_ensemble_members_draw_views_from_their_own_stores_bank(tmp_path, banked, bankless):
    from medembed.fit import ensemble_views, fit_run
    from medembed.protocol.splits import load_joined_splits
    from medembed.scorers.ensemble import make_ensemble
    from medembed.scorers.options import FitOptions

    stores = [banked, bankless]
    options = FitOptions(head="mlp", ensemble="mean", ensemble_seeds=2, head_params=MEMBER_MLP, n_resamples=0)
    fit_run(stores, tmp_path / "bank", options)
    run = json.loads((tmp_path / "bank" / "run.json").read_text())
    augmentation = run["details"]["augmentation"]
    assert augmentation["used"] is True and [b["used"] for b in augmentation["blocks"]] == [True, False]
    assert augmentation["blocks"][0]["recipe"]["views"] == K and augmentation["blocks"][1]["banks"] == []
    assert any(note.startswith(f"{banked.name}: augmentation bank:") for note in run["notes"])
    assert any(f"{bankless.name} has none" in note for note in run["notes"])
    assert not any("bank not used" in note for note in run["notes"])
    drawn = _member_selections(tmp_path / "bank")
    assert [name for name, s in drawn.items() if "views" in s] == ["mlp@0#0", "mlp@0#1"]  # store 0's members, not store 1's
    assert drawn["mlp@0#0"]["views"]["views"] == len(open_store(bank_path(banked)).read())

    # --no-augment-bank: no views, one note; the same ensemble fitted on the originals trains otherwise
    joined = load_joined_splits(stores, val_fraction=options.val_fraction, seed=options.seed)
    assert ensemble_views(stores, joined, replace(options, augment_bank=False)) == (
        None, {}, ["augmentation bank not used (--no-augment-bank): ensemble members train on the original train images"])
    train, val = joined.splits["train"], joined.splits["val"]
    plain = make_ensemble("mlp", MEMBER_MLP, "mean", joined.widths, options.ensemble_folds, options.seed, member_seeds=2)
    plain.fit(train.X, train.y, eval_set=[(val.X, val.y)], groups=train.patient_id)
    originals = {m["member"]: m["selection"] for m in plain.selection_["members"]}
    assert not any("views" in s for s in originals.values())
    assert drawn["mlp@0#0"]["train_loss"] != originals["mlp@0#0"]["train_loss"]  # the views were trained on
    assert drawn["mlp@1#0"]["train_loss"] == originals["mlp@1#0"]["train_loss"]  # the bankless store's members were not
    # views are a training-time input only: the saved ensemble is the one a fit without them writes
    plain.save(tmp_path / "plain")
    saved = [json.loads((folder / "ensemble.json").read_text()) for folder in (tmp_path / "bank" / "scorer", tmp_path / "plain")]
    assert saved[0]["params"] == saved[1]["params"] and saved[0]["members"] == saved[1]["members"]


def test_stacked_ensemble_fold_members_draw_only_their_folds_views(banked):
    from medembed.protocol.splits import load_joined_splits
    from medembed.scorers.ensemble import EnsembleScorer

    joined = load_joined_splits([banked], val_fraction=0.125, seed=0)
    train, val = joined.splits["train"], joined.splits["val"]
    views, _, _ = load_train_views([banked], train.image_id, None)
    scorer = EnsembleScorer(heads=("mlp", "logreg"), head_params={"mlp": {"max_epochs": 2, "hidden": [8]}, "logreg": {}}, combine="stack",
                            widths=joined.widths, folds=2)
    # each fold's mlp gets its fit rows' views counted within them (unsubset views would name rows outside the fold)
    scorer.fit(train.X, train.y, eval_set=[(val.X, val.y)], groups=train.patient_id, views=(views,))
    members = {m["member"]: m["selection"] for m in scorer.selection_["members"]}
    assert members["mlp@0"]["views"]["views"] == len(views.X) and "views" not in members["logreg@0"]
    assert scorer.meta_["folds"] == 2 and np.isfinite(scorer.predict_proba(val.X)).all()
    with pytest.raises(MedembedError, match="one TrainViews or None per block"):
        scorer.fit(train.X, train.y, eval_set=[(val.X, val.y)], views=(views, None))
