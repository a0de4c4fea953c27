"""Stage 2 end to end on real HDF5 stores: fit, calibrate on val, evaluate on test, run directory, refusals."""

import json

import numpy as np
import pytest

from medembed.errors import MedembedError
from medembed.options.transfer import TransferOptions
from medembed.scorers.options import FitOptions
from medembed.evaluate import evaluate_run
from medembed.fit import fit_run
from medembed.runs.record import load_run
from medembed.store import StoreWriter, make_fingerprint

FP = make_fingerprint(encoder="synthetic", model_id="test", embedding_kind="pooled", preprocess_hash="p", dtype="float32")
FAST = {"n_resamples": 50}


def write_store(path, n_patients=60, images_per_study=2, dim=16, seed=0, splits=("train", "val", "test"), fingerprint=FP, corrupt=None):
    """Patients with one study of several images each; abnormal studies are shifted along one direction."""
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(dim)
    ids, emb, cols = [], [], {k: [] for k in ("label", "study_id", "patient_id", "body_part", "split")}
    for p in range(n_patients):
        label = (p // len(splits)) % 3 == 0  # a third abnormal within every split
        split = splits[p % len(splits)]
        for k in range(images_per_study):
            ids.append(f"p{p}_img{k}")
            emb.append(rng.standard_normal(dim) + 1.5 * label * direction)
            cols["label"].append(int(label))
            cols["study_id"].append(f"p{p}_s1")
            cols["patient_id"].append(f"p{p}")
            cols["body_part"].append(("wrist", "elbow")[(p // len(splits)) % 2])
            cols["split"].append(split)
    emb = np.asarray(emb, dtype=np.float32)
    if corrupt:
        corrupt(ids, emb, cols)
    with StoreWriter(path, dim=dim, fingerprint=fingerprint) as writer:
        writer.append(ids, emb, cols)
    return path


@pytest.mark.parametrize("head", ["logreg", "mlp", "xgboost"])
def test_fit_writes_a_complete_run_directory(tmp_path, head):
    store = write_store(tmp_path / "s.h5")
    params = {"max_epochs": 20} if head == "mlp" else {"n_estimators": 50} if head == "xgboost" else {}
    metrics = fit_run([store], tmp_path / "run", FitOptions(head=head, head_params=params, **FAST))
    run = tmp_path / "run"
    for name in ("run.json", "metrics.json", "report.md", "predictions.csv", "scorer/head.json"):
        assert (run / name).is_file(), name
    assert {p.name for p in (run / "figures").glob("*.png")} >= {"roc_image.png", "roc_study.png", "reliability_study.png"}
    assert metrics["study"]["overall"]["auroc"]["value"] > 0.85
    lo, hi = metrics["study"]["overall"]["auroc"]["ci"]
    assert lo <= metrics["study"]["overall"]["auroc"]["value"] <= hi
    info = json.loads((run / "run.json").read_text())
    assert info["fingerprint"] == FP and info["split_sizes"]["test"]["studies"] == 20
    assert set(metrics["study"]["by_body_part"]) == {"wrist", "elbow"}
    # evaluate reproduces the numbers from the saved head, calibration and thresholds
    again = evaluate_run(run)
    assert again["study"]["overall"]["kappa"]["value"] == pytest.approx(metrics["study"]["overall"]["kappa"]["value"])


def test_thresholds_are_chosen_on_val_at_each_level(tmp_path):
    store = write_store(tmp_path / "s.h5", images_per_study=3)
    fit_run([store], tmp_path / "run", FitOptions(threshold="youden", calibration="platt", **FAST))
    run = load_run(tmp_path / "run")
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert 0 < run.calibration.image_threshold < 1 and 0 < run.calibration.study_threshold < 1
    assert info["calibration"]["kind"] == "platt" and info["options"]["threshold"] == "youden"


def test_val_is_carved_from_train_by_patient_when_missing(tmp_path):
    store = write_store(tmp_path / "s.h5", n_patients=90, splits=("train", "train", "test"))
    fit_run([store], tmp_path / "run", FitOptions(**FAST))
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert any("carved" in note for note in info["notes"])
    assert info["split_sizes"]["val"]["images"] > 0


def test_a_run_of_several_seeds_is_headed_by_its_mean_and_sd_on_the_console_in_the_report_and_in_compare(tmp_path):
    """Issue 21: `fit --seeds 3` printed seed 0's AUROC while the report's "Over seeds" said the mean."""
    from tests.cli.test_entry_point import run_cli

    store = write_store(tmp_path / "s.h5", corrupt=_weak_signal)
    done = run_cli("fit", store, "--head", "mlp", "-p", "max_epochs=5", "--seeds", "3", "--bootstrap", "50", "--out", tmp_path / "run")
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    summary = metrics["over_seeds"]["image"]["overall"]["auroc"]
    assert summary["n_seeds"] == 3 and metrics["over_seeds"]["seeds"] == [0, 1, 2]
    assert len(set(summary["values"])) == 3, "premise: the seeds' AUROCs differ"
    seed0 = metrics["image"]["overall"]["auroc"]
    assert summary["values"][0] == seed0["value"] and abs(summary["mean"] - seed0["value"]) > 5e-4
    headline = f"{summary['mean']:.3f} ± {summary['sd']:.3f} (seed 0: {seed0['value']:.3f} [{seed0['ci'][0]:.3f}, {seed0['ci'][1]:.3f}])"
    assert f"image  auroc {headline}" in done.stdout
    assert f"| AUROC | {headline} |" in (tmp_path / "run" / "report.md").read_text()
    compared = run_cli("compare", tmp_path / "run", "--level", "image")
    assert compared.returncode == 0, compared.stderr
    assert f"| {headline} |" in compared.stdout
    assert f"{seed0['value']:.3f} [" not in compared.stdout.replace(f"seed 0: {seed0['value']:.3f} [", "")  # seed 0 never stands alone


def _weak_signal(ids, emb, cols):
    """Embeddings that separate the classes only partly, so each seed's MLP ends at a different AUROC."""
    emb[:] = np.random.default_rng(5).standard_normal(emb.shape) + 0.6 * np.asarray(cols["label"])[:, None]


def _nan_row(ids, emb, cols):
    emb[3, 0] = np.nan


def _single_class_train(ids, emb, cols):
    cols["label"] = [0 if s == "train" else label for s, label in zip(cols["split"], cols["label"])]


def _leak_patient(ids, emb, cols):
    cols["patient_id"][0] = cols["patient_id"][-1]  # one patient in two splits
    cols["split"][0] = "train"


def _no_labels(ids, emb, cols):
    cols["label"] = [-1] * len(ids)


def test_a_head_that_used_up_its_epochs_while_improving_is_named_with_the_parameter_that_gives_more(tmp_path):
    from tests.cli.test_entry_point import run_cli

    store = write_store(tmp_path / "s.h5")
    done = run_cli("fit", store, "--head", "mlp", "-p", "max_epochs=1", "--seeds", "2", "--bootstrap", "0", "--out", tmp_path / "mlp")
    assert done.returncode == 0, done.stderr
    line = ("mlp: its best val AUROC was at its last epoch (1 of -p max_epochs=1) in seeds 0, 1: still rising when training "
            "stopped; a larger -p max_epochs may fit better")
    assert f"warning: {line}" in done.stderr and line in json.loads((tmp_path / "mlp" / "run.json").read_text())["notes"]
    fit_run([store], tmp_path / "ensemble", FitOptions(head="logreg,mlp", ensemble="mean", head_params={"mlp.max_epochs": 1}, n_resamples=0))
    notes = json.loads((tmp_path / "ensemble" / "run.json").read_text())["notes"]
    assert [n.split(":")[0] for n in notes if "last epoch" in n] == ["mlp@0"] and any("(1 of -p mlp.max_epochs=1)" in n for n in notes)
    fit_run([store], tmp_path / "room", FitOptions(head="mlp", head_params={"max_epochs": 200, "patience": 2}, n_resamples=0))
    assert not any("last epoch" in n for n in json.loads((tmp_path / "room" / "run.json").read_text())["notes"])  # early stopping ended it


@pytest.mark.parametrize(
    "corrupt, message",
    [(_nan_row, "NaN or infinite"), (_single_class_train, "train split has a single class"), (_leak_patient, "leakage"), (_no_labels, "no labels")],
)
def test_bad_stores_are_refused_with_clear_errors(tmp_path, corrupt, message):
    store = write_store(tmp_path / "s.h5", corrupt=corrupt)
    with pytest.raises(MedembedError, match=message):
        fit_run([store], tmp_path / "run", FitOptions(**FAST))


def test_stores_with_different_fingerprints_are_not_mixed(tmp_path):
    a = write_store(tmp_path / "a.h5")
    b = write_store(tmp_path / "b.h5", fingerprint=dict(FP, encoder="other"))
    with pytest.raises(MedembedError, match="fingerprints differ"):
        fit_run([a, b], tmp_path / "run", FitOptions(**FAST))
    fit_run([a], tmp_path / "run", FitOptions(**FAST))
    with pytest.raises(MedembedError, match="differ from the ones this run was fitted on"):
        evaluate_run(tmp_path / "run", stores=[b])


def test_a_failed_fit_leaves_the_previous_run_intact(tmp_path):
    store = write_store(tmp_path / "s.h5")
    fit_run([store], tmp_path / "run", FitOptions(**FAST))
    before = {p.relative_to(tmp_path / "run"): p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    # a random forest fits, but its state (trees) cannot be saved without pickle: the write fails midway
    with pytest.raises(MedembedError, match="without pickle"):
        fit_run([store], tmp_path / "run", FitOptions(head="sklearn:sklearn.ensemble.RandomForestClassifier", head_params={"n_estimators": 3}, **FAST))
    after = {p.relative_to(tmp_path / "run"): p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".run")] == []


def test_fit_refuses_a_store_an_extraction_is_still_writing(tmp_path):
    store = write_store(tmp_path / "s.h5")
    with StoreWriter(store, dim=16, fingerprint=FP):  # holds the writer lock, as a running extraction does
        with pytest.raises(MedembedError, match="still writing"):
            fit_run([store], tmp_path / "run", FitOptions(**FAST))
    assert not (tmp_path / "run").exists()


def test_a_run_reads_back_its_typed_options(tmp_path):
    """run.json's options come back as the dataclass fit was given, not a loose dict."""
    options = FitOptions(head="logreg", threshold="youden", seeds=2, **FAST)
    fit_run([write_store(tmp_path / "s.h5")], tmp_path / "run", options)
    record = load_run(tmp_path / "run").record
    assert isinstance(record.options, FitOptions) and record.options == options
    assert record.protocol.threshold == "youden" and record.level == ""


def test_bootstrap_resamples_are_bounded():
    """A tampered run.json (or a typo) cannot make evaluate bootstrap for days."""
    with pytest.raises(MedembedError, match="at most 100,000"):
        FitOptions(n_resamples=10**9)


def test_evaluate_writes_beside_the_fit_and_never_over_its_results(tmp_path):
    """Issue 21: `evaluate RUN --by ... --bootstrap 200` replaced the fit's report.md and metrics.json."""
    from tests.cli.test_entry_point import run_cli

    store = write_store(tmp_path / "s.h5")
    fit_run([store], tmp_path / "run", FitOptions(n_resamples=20))
    run = tmp_path / "run"
    fitted = {name: (run / name).read_bytes() for name in ("metrics.json", "report.md", "predictions.csv", "run.json")}
    done = run_cli("evaluate", run, "--bootstrap", "30", "--by", "body_part")
    assert done.returncode == 0, done.stderr
    evaluation = run / "evaluations" / "test-bootstrap30-by-body_part"
    assert f"evaluation written to {evaluation}" in done.stdout
    assert {name: (run / name).read_bytes() for name in fitted} == fitted
    for name in ("metrics.json", "report.md", "predictions.csv", "transfer.json", "evaluation.json", "figures/roc_study.png"):
        assert (evaluation / name).is_file(), name
    assert json.loads((evaluation / "metrics.json").read_text())["study"]["bootstrap"]["n_resamples"] == 30
    assert json.loads((evaluation / "evaluation.json").read_text())["transfer"]["by"] == "body_part"
    assert "30 resamples" in (evaluation / "report.md").read_text() and "### By body_part" in (evaluation / "report.md").read_text()
    # the same evaluation again replaces its own folder; another one gets its own
    assert evaluate_run(run, n_resamples=30, transfer=TransferOptions(by="body_part"))["study"]["bootstrap"]["n_resamples"] == 30
    evaluate_run(run, split="val", n_resamples=0)
    assert sorted(p.name for p in (run / "evaluations").iterdir()) == ["test-bootstrap30-by-body_part", "val-bootstrap0"]
    assert {name: (run / name).read_bytes() for name in fitted} == fitted
    load_run(run)  # the run with its evaluations still loads
    compared = run_cli("compare", run)
    assert compared.returncode == 0 and "95%, 20 × patients" in compared.stdout  # the fit's own resamples


def test_evaluation_names_say_what_was_asked_and_are_safe_folder_names(tmp_path):
    from medembed.evaluate import evaluation_directory, evaluation_name

    assert evaluation_name() == "test"
    assert evaluation_name("test", None, 200, TransferOptions(by="site")) == "test-bootstrap200-by-site"
    assert evaluation_name("val", [tmp_path / "a.h5", tmp_path / "b.h5"], None, TransferOptions(alpha=0.2, class_conditional=True)) == \
        "val-on-a+b-alpha0.2-class-conditional"
    odd = evaluation_name("test", [tmp_path / "../é x;rm -rf.h5"])
    assert odd == "test-on-__x_rm_-rf" and "/" not in odd
    long = evaluation_name("test", [tmp_path / f"store{k}.h5" for k in range(40)])
    assert len(long) == 113 and long == evaluation_name("test", [tmp_path / f"store{k}.h5" for k in range(40)])
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(MedembedError, match="must lie directly in"):
        evaluation_directory(run, "..")
    (tmp_path / "elsewhere").mkdir()
    (run / "evaluations").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(MedembedError, match="not a link"):
        evaluation_directory(run, "test")
