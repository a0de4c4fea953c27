"""run.json's provenance: the command line or API call, library versions, the git commit of a checkout, input paths
relative to the run directory (a run moved with its store still finds it), validated when read back."""

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version

import numpy as np
import pytest

from medembed import api
from medembed.errors import MedembedError
from medembed.evaluate import evaluate_run
from medembed.runs.provenance import git_state, library_versions
from medembed.runs.record import load_run, read_record
from medembed.store import StoreWriter, make_fingerprint
from tests.conftest import REPO
from tests.test_fit import write_store

FAST = ["--head", "logreg", "--bootstrap", "20"]


def run_checkout_cli(*args, cwd=None):
    """`medembed ARGS` from this checkout (python -m cli.main), as a user of a checkout runs it."""
    return subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], cwd=cwd or REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prov")
    (folder / "data").mkdir()
    store = write_store(folder / "data" / "s.h5")
    run = folder / "runs" / "r"
    done = run_checkout_cli("fit", store, *FAST, "--out", run)
    assert done.returncode == 0, done.stderr[-2000:]
    return folder, store, run


def test_cli_run_records_argv_versions_git_and_relative_store(cli_run):
    folder, store, run = cli_run
    provenance = json.loads((run / "run.json").read_text())["provenance"]
    assert provenance["invocation"] == {"argv": ["medembed", "fit", str(store), *FAST, "--out", str(run)]}
    versions = provenance["versions"]
    assert versions["numpy"] == version("numpy") and versions["h5py"] == version("h5py") and versions["scikit-learn"] == version("scikit-learn")
    assert versions["python"] == ".".join(map(str, sys.version_info[:3])) and "medembed" in versions and "xgboost" in versions
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    if head:  # run from this checkout: its commit, and whether the tree had changes
        assert provenance["git"]["commit"] == head and isinstance(provenance["git"]["dirty"], bool)
    assert provenance["relative_inputs"] == {"stores": ["../../data/s.h5"]}
    assert json.loads((run / "run.json").read_text())["inputs"]["stores"] == [str(store.resolve())]  # loading reads this first


def test_a_run_moved_with_its_store_still_evaluates(cli_run, tmp_path):
    folder, _, run = cli_run
    moved = tmp_path / "elsewhere"
    shutil.copytree(folder, moved)  # the absolute path stays valid for the original: remove it in the copy's view
    record = json.loads((moved / "runs" / "r" / "run.json").read_text())
    record["inputs"]["stores"] = [str(tmp_path / "gone" / "s.h5")]  # as if the original folder had been moved away
    (moved / "runs" / "r" / "run.json").write_text(json.dumps(record))
    loaded = read_record(moved / "runs" / "r")
    assert loaded.inputs["stores"] == [str(moved / "runs" / "r" / "../../data/s.h5")]
    assert any("is gone; read" in note for note in loaded.notes)
    metrics = evaluate_run(moved / "runs" / "r")
    assert 0 <= metrics["image"]["overall"]["auroc"]["value"] <= 1


def test_api_fit_records_the_call_and_its_arguments(tmp_path):
    store = write_store(tmp_path / "s.h5")
    run = api.fit(store, tmp_path / "run", head="logreg", bootstrap=20)
    invocation = run.record.provenance["invocation"]
    assert invocation == {"api": "medembed.api.fit", "arguments": {"stores": [str(store)], "out": str(tmp_path / "run"), "head": "logreg", "bootstrap": 20}}


@pytest.mark.parametrize("change, message", [
    (lambda p: p.update(versions=["numpy"]), "provenance.versions must be an object"),
    (lambda p: p["invocation"].update(argv=["medembed", 3]), "provenance.invocation.argv must be a list of strings"),
    (lambda p: p.update(git={"commit": "abc", "dirty": "no"}), "provenance.git must be"),
    (lambda p: p.update(relative_inputs={"stores": "../s.h5"}), "provenance.relative_inputs.stores must be a list of paths"),
    (lambda p: p.update(extra=1), "provenance has unexpected keys ['extra']"),
])
def test_tampered_provenance_is_one_error_naming_run_json(cli_run, tmp_path, change, message):
    run = tmp_path / "r"
    shutil.copytree(cli_run[2], run)
    document = json.loads((run / "run.json").read_text())
    change(document["provenance"])
    (run / "run.json").write_text(json.dumps(document))
    with pytest.raises(MedembedError, match="run.json: " + message.replace("[", r"\[").replace("]", r"\]")):
        load_run(run)


def test_a_run_without_provenance_still_loads(cli_run, tmp_path):
    run = tmp_path / "old"
    shutil.copytree(cli_run[2], run)
    document = json.loads((run / "run.json").read_text())
    del document["provenance"]
    (run / "run.json").write_text(json.dumps(document))
    assert load_run(run).record.provenance == {}


def test_git_state_of_a_checkout_and_of_no_checkout(tmp_path):
    assert git_state(str(tmp_path)) == {}  # not a repository: no field, no error
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "__init__.py").write_text("")
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "__init__.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert git_state(str(repo)) == {"commit": head, "dirty": False}
    (repo / "__init__.py").write_text("changed = True\n")
    git_state.cache_clear()
    assert git_state(str(repo)) == {"commit": head, "dirty": True}
    git_state.cache_clear()


def test_versions_are_read_without_importing_the_libraries():
    script = "import sys; from medembed.runs.provenance import library_versions; v = library_versions(); " \
             "print(sorted(m for m in ('torch', 'transformers', 'sklearn', 'xgboost', 'h5py') if m in sys.modules)); print(v['numpy'])"
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines() == ["[]", version("numpy")], done.stderr[-2000:]
    assert set(library_versions()) >= {"python", "medembed", "torch", "transformers", "scikit-learn", "xgboost", "numpy", "h5py"}


def test_level_auto_says_its_choice_on_the_console(tmp_path):
    dim, rng = 6, np.random.default_rng(0)
    fingerprint = make_fingerprint(encoder="synthetic", model_id="t", embedding_kind="pooled", preprocess_hash="p", dtype="float32", levels="final@1x1,final@2x2")
    n = 90
    y = ((np.arange(n) // 3) % 3 == 0).astype(int)
    pooled = rng.standard_normal((n, dim)).astype(np.float32) + y[:, None]
    columns = {"label": y, "study_id": [f"s{i}" for i in range(n)], "patient_id": [f"p{i}" for i in range(n)],
               "body_part": ["wrist"] * n, "split": [("train", "val", "test")[i % 3] for i in range(n)]}
    tokens = {"final@1x1": pooled[:, None, :], "final@2x2": np.repeat(pooled[:, None, :], 4, axis=1) + rng.standard_normal((n, 4, dim)).astype(np.float32)}
    with StoreWriter(tmp_path / "t.h5", dim=dim, fingerprint=fingerprint, tokens={k: v.shape[1:] for k, v in tokens.items()}) as writer:
        writer.append([f"i{i}" for i in range(n)], pooled, columns, tokens=tokens)
    done = run_checkout_cli("fit", tmp_path / "t.h5", "--head", "concat", "--level", "auto", "--bootstrap", "0", "--out", tmp_path / "run")
    assert done.returncode == 0, done.stderr[-2000:]
    chosen = json.loads((tmp_path / "run" / "run.json").read_text())["options"]["level"]
    assert f"--level auto chose {chosen} (val AUROC" in done.stdout


def test_a_recalibrated_run_records_its_own_invocation_not_the_source_runs(cli_run, tmp_path):
    _, store, run = cli_run
    target = write_store(tmp_path / "target.h5", seed=3)
    done = run_checkout_cli("recalibrate", run, target, "--labelled", "30", "--bootstrap", "0", "--out", tmp_path / "recalibrated")
    assert done.returncode == 0, done.stderr[-2000:]
    provenance = json.loads((tmp_path / "recalibrated" / "run.json").read_text())["provenance"]
    assert provenance["invocation"]["argv"][:2] == ["medembed", "recalibrate"]
    assert provenance["relative_inputs"]["stores"] == [os.path.relpath(store.resolve(), (tmp_path / "recalibrated").resolve())]
