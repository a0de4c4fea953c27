"""Ensembles (medembed.scorers.ensemble): head ensembles on one store, stores of several encoders joined by image id,
stacking on out-of-fold train predictions, the run directory round trip, and the refusals."""

import json
import re
import shutil

import numpy as np
import pytest

from medembed.protocol.splits import join_stores, load_joined_splits
from medembed.scorers.ensemble import EnsembleScorer, _folds, split_head_params
from medembed.errors import MedembedError
from medembed.scorers.options import FitOptions
from medembed.evaluate import evaluate_run
from medembed.fit import fit_run
from medembed.data.manifest import Manifest
from medembed.runs.record import load_run
from tests.cli.test_entry_point import assert_round_trip, run_cli
from tests.test_fit import FP, write_store

OTHER = {**FP, "encoder": "other-encoder", "preprocess_hash": "q"}
FAST = {"n_resamples": 0}
MLP = {"mlp.max_epochs": 15}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two encoders' stores of the same 120 images (one signal direction each), and a noise-only third."""
    base = tmp_path_factory.mktemp("ensemble")
    a = write_store(base / "a.h5", dim=16, seed=0)
    b = write_store(base / "b.h5", dim=8, seed=1, fingerprint=OTHER)

    def noise(ids, emb, cols):
        emb[:] = np.random.default_rng(5).standard_normal(emb.shape)

    n = write_store(base / "noise.h5", dim=8, seed=2, fingerprint={**FP, "encoder": "noise"}, corrupt=noise)
    return base, a, b, n


def test_a_head_ensemble_on_one_store_writes_an_ensemble_run_that_evaluates_alike(stores, tmp_path):
    base, a, _, _ = stores
    metrics = fit_run([a], tmp_path / "run", FitOptions(head="logreg,mlp", ensemble="mean", head_params=MLP, **FAST))
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["kind"] == "ensemble" and record["scorer"] == "mean:logreg,mlp"
    assert record["fingerprint"] == FP and record["details"]["members"][0]["fingerprint"] == FP
    assert metrics["study"]["overall"]["auroc"]["value"] > 0.85
    again = evaluate_run(tmp_path / "run")
    assert again["study"]["overall"]["auroc"]["value"] == pytest.approx(metrics["study"]["overall"]["auroc"]["value"], abs=1e-12)
    scorer = load_run(tmp_path / "run").scorer
    assert scorer.member_names() == ["logreg@0", "mlp@0"]
    assert sorted(p.name for p in (tmp_path / "run" / "scorer").iterdir()) == ["ensemble.json", "member-0", "member-1"]


def test_each_members_own_test_auroc_is_recorded_reported_and_printed(stores, tmp_path):
    base, a, b, noise = stores
    fit_run([a, b, noise], tmp_path / "run", FitOptions(head="logreg", ensemble="mean", seeds=2, **FAST))
    table = json.loads((tmp_path / "run" / "run.json").read_text())["details"]["member_aurocs"]
    assert table["members"] == ["logreg@0", "logreg@1", "logreg@2"] and table["seeds"] == [0, 1]
    assert table["reads"] == ["a.h5 pooled", "b.h5 pooled", "noise.h5 pooled"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for level in ("image", "study"):
        first = table[level]["members"][0]
        assert min(first[0], first[1]) > 0.85 > first[2]  # the noise store's member brings nothing (30 test studies: far from 0.5)
        assert table[level]["ensemble"][0] == pytest.approx(metrics[level]["overall"]["auroc"]["value"], abs=1e-12)
    alone = fit_run([a], tmp_path / "alone", FitOptions(head="logreg", **FAST))  # the same train rows, the same logreg
    assert table["image"]["members"][0][0] == pytest.approx(alone["image"]["overall"]["auroc"]["value"], abs=1e-9)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Members" in report and "| logreg@2 | noise.h5 pooled |" in report and "**ensemble (mean)**" in report
    evaluate_run(tmp_path / "run")  # an evaluation of the kept (first-seed) scorer shows its members too
    evaluated = next((tmp_path / "run" / "evaluations").glob("*/report.md")).read_text()
    assert f"| logreg@0 | a.h5 pooled | {table['image']['members'][0][0]:.3f} |" in evaluated
    done = run_cli("fit", a, b, "--ensemble", "mean", "--head", "logreg", "--bootstrap", "0", "--out", tmp_path / "cli")
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"members' test AUROC \(study level, before combining\): logreg@0 \(a\.h5 pooled\) [01]\.\d{3}; logreg@1", done.stdout + done.stderr)


def test_stacking_weighs_members_by_out_of_fold_train_predictions(stores):
    """The meta-model learns, from train rows each member never saw, to trust the informative store over noise."""
    base, a, _, n = stores
    joined = load_joined_splits([a, n], val_fraction=0.125, seed=0)
    train, val = joined.splits["train"], joined.splits["val"]
    scorer = EnsembleScorer(heads=("logreg",), combine="stack", widths=joined.widths, folds=3)
    scorer.fit(train.X, train.y, eval_set=[(val.X, val.y)], groups=train.patient_id)
    meta = scorer.meta_
    assert meta["folds"] == 3 and meta["grouped"]
    assert meta["oof_auroc"][0] > 0.85 > 0.7 > meta["oof_auroc"][1]
    assert meta["weights"][0] > 3 * abs(meta["weights"][1])
    # The members themselves are refitted on all of train; the combination is a logistic model of their logits.
    p = scorer.member_probabilities(train.X.astype(np.float32))
    assert p.shape == (len(train), 2)
    assert np.all((scorer.predict_proba(train.X)[:, 1] > 0) & (scorer.predict_proba(train.X)[:, 1] < 1))


def test_stacking_folds_keep_each_patient_on_one_side():
    y = np.array([0, 0, 1, 1] * 10)
    groups = np.repeat(np.arange(20), 2)
    for fit_rows, held_out in _folds(y, groups, 4, seed=0):
        assert not set(groups[fit_rows]) & set(groups[held_out])
    with pytest.raises(MedembedError, match="at least 5 train rows of each class"):
        _folds(np.array([0] * 10 + [1] * 3), None, 5, seed=0)


def test_stores_of_two_encoders_join_by_image_id_and_refuse_what_cannot_be_joined(stores, tmp_path):
    base, a, b, _ = stores
    table, notes = join_stores([a, b])
    assert table.embeddings.shape == (120, 24) and not notes

    def drop_half(ids, emb, cols):  # the second store lacks every other image
        del ids[::2], cols["label"][::2], cols["study_id"][::2], cols["patient_id"][::2], cols["body_part"][::2], cols["split"][::2]
        emb.resize((len(ids), emb.shape[1]), refcheck=False)

    half = write_store(tmp_path / "half.h5", dim=8, seed=1, fingerprint=OTHER, corrupt=drop_half)
    table, notes = join_stores([a, half])
    assert len(table) == 60 and "60 member rows" in notes[0]

    def rename(ids, emb, cols):
        ids[:] = [f"x{i}" for i in ids]

    with pytest.raises(MedembedError, match="share no image ids"):
        join_stores([a, write_store(tmp_path / "other-ids.h5", dim=8, fingerprint=OTHER, corrupt=rename)])

    def relabel(ids, emb, cols):
        cols["label"][:4] = [1 - v for v in cols["label"][:4]]

    with pytest.raises(MedembedError, match="4 images have another label"):
        join_stores([a, write_store(tmp_path / "relabelled.h5", dim=8, fingerprint=OTHER, corrupt=relabel)])
    with pytest.raises(MedembedError, match="one fingerprint"):
        load_joined_splits([a, write_store(tmp_path / "a-again.h5")], val_fraction=0.125, seed=0)


@pytest.mark.parametrize("combine", ["concat", "stack"])
def test_an_ensemble_of_two_stores_keeps_each_member_fingerprint_and_checks_it_on_evaluate(stores, tmp_path, combine):
    base, a, b, _ = stores
    fit_run([a, b], tmp_path / "run", FitOptions(head="logreg", ensemble=combine, ensemble_folds=3, **FAST))
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [m["fingerprint"]["encoder"] for m in record["details"]["members"]] == ["synthetic", "other-encoder"]
    assert record["fingerprint"]["encoder"] == "synthetic + other-encoder"
    assert record["details"]["member_aurocs"]["reads"] == (["all stores joined"] if combine == "concat" else ["a.h5 pooled", "b.h5 pooled"])
    assert evaluate_run(tmp_path / "run", stores=[a, b])["study"]["overall"]["auroc"]["value"] > 0.85
    with pytest.raises(MedembedError, match="differ from member 1"):
        evaluate_run(tmp_path / "run", stores=[a, a])
    with pytest.raises(MedembedError, match="give 2 --store"):
        evaluate_run(tmp_path / "run", stores=[a])


def test_a_saved_ensemble_loads_back_identically_and_a_tampered_one_is_refused(stores, tmp_path):
    base, a, b, _ = stores
    joined = load_joined_splits([a, b], val_fraction=0.125, seed=0)
    train, val, test = (joined.splits[s] for s in ("train", "val", "test"))
    scorer = EnsembleScorer(heads=("logreg",), combine="stack", widths=joined.widths, folds=3).fit(train.X, train.y, eval_set=[(val.X, val.y)])
    scorer.save(tmp_path / "e")
    loaded = EnsembleScorer.load(tmp_path / "e")
    np.testing.assert_allclose(loaded.predict_proba(test.X), scorer.predict_proba(test.X), atol=1e-12)
    document = json.loads((tmp_path / "e" / "ensemble.json").read_text())
    document["meta"]["weights"] = [1.0]
    (tmp_path / "e" / "ensemble.json").write_text(json.dumps(document))
    with pytest.raises(MedembedError, match="meta.weights must be 2 numbers"):
        EnsembleScorer.load(tmp_path / "e")
    with pytest.raises(MedembedError, match="has 16 features; this ensemble joins stores of widths"):
        scorer.predict_proba(train.X[:, :16])


def test_head_parameters_go_to_the_head_they_name():
    assert split_head_params(("logreg", "mlp"), {"mlp.hidden": [8], "class_weight": "balanced"}) == {
        "logreg": {"class_weight": "balanced"}, "mlp": {"hidden": [8], "class_weight": "balanced"},
    }
    with pytest.raises(MedembedError, match="names head 'xgboost'"):
        split_head_params(("logreg",), {"xgboost.n_estimators": 5})


def test_the_cli_fits_ensembles_and_refuses_in_one_line(stores, tmp_path):
    base, a, b, _ = stores
    done = run_cli("fit", a, b, "--ensemble", "concat", "--head", "logreg", "--bootstrap", "0", "--out", tmp_path / "run")
    assert done.returncode == 0 and "study" in done.stdout, done.stderr
    assert json.loads((tmp_path / "run" / "run.json").read_text())["kind"] == "ensemble"
    refusals = [  # each one line, exit 2, before any fit (the rest of the refusals are library tests below)
        (["fit", a, "--head", "logreg,mlp"], "combine them with --ensemble mean or --ensemble stack"),
        (["fit", a, "--ensemble", "concat"], "--ensemble concat joins the features of several stores"),
    ]
    for args, message in refusals:
        done = run_cli(*args, "--out", tmp_path / "refused")
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "refused").exists()


def test_an_ensemble_of_two_real_encoders_round_trips_through_evaluate_compare_and_predict(tmp_path, fracatlas_root, monkeypatch):
    from medembed.encoders import get_encoder
    from medembed.options.extract import ExtractOptions
    from medembed.extract.runner import extract
    from medembed.data.manifest import build_fracatlas

    manifest, _ = build_fracatlas(fracatlas_root)
    small = manifest.subset(np.r_[np.flatnonzero(manifest.label == 1)[:9], np.flatnonzero(manifest.label == 0)[:9]])
    small = Manifest({**small.columns, "split": np.array(["train", "val", "test"] * 6, dtype=object)})
    stores = []
    for name in ("efficientnet-lite0", "efficientnet-lite1"):
        options = {"size": 64}
        extract(small, fracatlas_root, get_encoder(name, **options), tmp_path / f"{name}.h5",
                ExtractOptions(batch_size=8, num_workers=0), encoder_options=options)
        stores.append(tmp_path / f"{name}.h5")
    fit_run(stores, tmp_path / "run", FitOptions(head="logreg", ensemble="mean", n_resamples=0))
    test = small.subset(small.split == "test")
    monkeypatch.setenv("MEDEMBED_CACHE", str(tmp_path / "cache"))  # predict's cache folder (the CLI's default)
    assert_round_trip(tmp_path / "run", test.resolve(fracatlas_root)[:3], tmp_path)
    caches = sorted(p.name for p in (tmp_path / "cache").glob("*/*.h5"))  # one store per member, none beside --out
    assert len(caches) == 2 and caches[0].endswith(".member0.embeddings.h5") and not list(tmp_path.glob("p*.h5")), caches
    shutil.rmtree(tmp_path / "images")


@pytest.mark.parametrize("options, message", [
    ({"ensemble": "mean"}, "combines several members"),
    ({"ensemble": "vote"}, "ensemble must be one of concat, mean, stack"),
    ({"ensemble": "stack", "head": "logreg,mlp", "ensemble_folds": 1}, "ensemble_folds must be an integer >= 2"),
    ({"ensemble": "mean", "head": "logreg,logreg"}, "repeats a head"),
    ({"ensemble": "mean", "head": "logreg,mlp", "head_params": {"mlp.depth": 2}}, "unknown parameter(s) depth"),
])
def test_ensemble_options_are_refused_before_any_fit(stores, tmp_path, options, message):
    base, a, _, _ = stores
    with pytest.raises(MedembedError, match=re.escape(message)):
        fit_run([a], tmp_path / "run", FitOptions(**options))
    assert not (tmp_path / "run").exists()


def test_a_stack_of_token_members_learns_a_planted_cell_and_round_trips(tmp_path):
    """Attention and concat members on one token block, two seeds each, stacked on out-of-fold train predictions:
    the marked cell is found, and the saved ensemble reproduces its probabilities."""
    from medembed.scorers.members import MemberInputs

    rng = np.random.default_rng(0)

    def rows(n):
        y = rng.integers(0, 2, n)
        tokens = rng.normal(size=(n, 5, 6)).astype(np.float16)
        tokens[y == 1, 2, 0] += 2.0  # one cell of the grid carries the finding
        return MemberInputs(rng.normal(size=(n, 4)).astype(np.float16), (tokens,)), y

    (X, y), (X_val, y_val), (X_test, y_test) = rows(160), rows(60), rows(200)
    block = {"store": 0, "level": "block14", "token_shape": [5, 6], "encoder": "efficientnet-lite0", "encoder_options": {}}
    scorer = EnsembleScorer(heads=("attention", "concat"), head_params={"attention": {"max_epochs": 4, "hidden": 8, "attention": 4, "n_jobs": 1}},
                            combine="stack", widths=(4,), blocks=(block,), folds=3, member_seeds=2)
    scorer.fit(X, y, eval_set=[(X_val, y_val)], groups=np.arange(160))
    assert scorer.member_names() == ["attention@0#0", "attention@0#1", "concat@0#0", "concat@0#1"]
    assert [m.seed for m in scorer.members_] == [0, 1, 0, 1]
    p = scorer.predict_proba(X_test)[:, 1]
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y_test, p) > 0.8
    scorer.save(tmp_path / "stack")
    np.testing.assert_array_equal(EnsembleScorer.load(tmp_path / "stack").predict_proba(X_test)[:, 1], p)
    with pytest.raises(MedembedError, match="members read token levels"):
        scorer.predict_proba(X_test.pooled)
    with pytest.raises(MedembedError, match=r"block 0 \(block14\) has tokens \(5, 3\)"):
        scorer.predict_proba(MemberInputs(X_test.pooled, (X_test.blocks[0][:, :, :3],)))
