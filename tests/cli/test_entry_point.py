"""The installed `medembed` entry point as a user runs it, in a subprocess: wrong invocations give a usage line or
one error line with the right exit code and never a traceback; --help shows the library's defaults."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medembed.options.baselines import AutoencoderOptions
from medembed.options.baselines import CNNOptions
from medembed.options.extract import ExtractOptions
from medembed.scorers.options import FitOptions
from medembed.fit import fit_run
from medembed.data.manifest import Manifest
from medembed.options.protocol import ProtocolOptions
from medembed.options.zeroshot import ZeroShotOptions
from tests.test_fit import write_store

MEDEMBED = shutil.which("medembed", path=str(Path(sys.executable).parent)) or shutil.which("medembed")


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "400"}
    env.pop("MEDEMBED_DEBUG", None)
    return subprocess.run([MEDEMBED, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    store = write_store(base / "s.h5")
    fit_run([store], base / "run", FitOptions(n_resamples=0))
    (base / "m.csv").write_text("image_id,path,label,split\na,a.png,0,train\na,b.png,2,val\n")
    return base


def broken_run(work: Path, name: str, change) -> Path:
    """A copy of the fitted run whose run.json `change` rewrites (a dict -> dict, or bytes)."""
    target = work / name
    if not target.exists():
        shutil.copytree(work / "run", target)
        record = json.loads((target / "run.json").read_text())
        changed = change(record)
        (target / "run.json").write_bytes(changed if isinstance(changed, bytes) else json.dumps(changed).encode())
    return target


USAGE = [  # (arguments, exit code, text the output must contain)
    (["nosuchcmd"], 2, "No such command"),
    (["fit"], 2, "Missing argument"),
    (["extract", "x.csv", "--bogus"], 2, "No such option: --bogus"),
    (["fit", "{store}", "--out", "{work}/r", "--seeds", "many"], 2, "Invalid value for '--seeds'"),
    (["evaluate", "{work}/run", "--split", "holdout"], 2, "expected train, val or test"),
    (["compare", "{work}/run", "--level", "patient"], 2, "expected image or study"),
]
LIBRARY = [
    (["fit", "{store}", "--out", "{work}/r", "--head", "nope"], 2, "unknown head 'nope'"),
    (["fit", "{store}", "--out", "{work}/r", "--threshold", "best"], 2, "unknown threshold rule 'best'"),
    (["fit", "{store}", "--out", "{work}/r", "--calibration", "magic"], 2, "calibration must be one of"),
    (["fit", "{store}", "--out", "{work}/r", "-p", "hidden"], 2, "expected key=value"),
    (["fit", "{store}", "--out", "{work}/r", "--head", "mlp", "-p", "hidden=[1000000000]"], 2, "'hidden' must be at most"),
    (["fit", "{store}", "--out", "{work}/r", "--head", "logreg", "-p", "depth=3"], 2, "unknown parameter(s) depth"),
    (["fit", "{work}/missing.h5", "--out", "{work}/r"], 2, "missing.h5"),
    (["extract", "{work}/m.csv", "--root", "{work}", "--out", "{work}/x.h5", "--batch-size", "0"], 2, "batch_size must be"),
    (["extract", "{work}/m.csv", "--root", "{work}", "--out", "{work}/x.h5", "--precision", "fp8"], 2, "precision must be one of"),
    (["predict", "{work}/no-run", "img.jpg"], 2, "no such run directory"),
    (["evaluate", "{work}/no-run"], 2, "no such run directory"),
    (["compare", "{work}/run", "{work}"], 2, "not a medembed run directory"),
    (["baseline", "cnn", "m.csv", "--root", ".", "--out", "r", "--size", "8"], 2, "too small"),
    (["info", "{work}/missing.h5"], 2, "missing.h5"),
]
RUN_JSON = [  # run.json variants: (name, change, message)
    ("nan-threshold", lambda r: {**r, "image_threshold": float("nan")}, "non-finite number NaN"),
    ("big-threshold", lambda r: {**r, "study_threshold": 2.0}, "not a probability in [0, 1]"),
    ("negative-threshold", lambda r: {**r, "image_threshold": -1.0}, "not a probability in [0, 1]"),
    ("missing-key", lambda r: {k: v for k, v in r.items() if k != "calibration"}, "missing key 'calibration'"),
    ("wrong-type", lambda r: {**r, "split_sizes": "many"}, "'split_sizes' must be an object"),
    ("array", lambda r: [r], "expected a JSON object"),
    ("pickle", lambda r: b"\x80\x04\x95\x00\x00\x00\x00", "not a valid run.json"),
    ("unknown-kind", lambda r: {**r, "kind": "magic"}, "unknown run kind 'magic'"),
    ("bad-options", lambda r: {**r, "options": {**r["options"], "threshold": "best"}}, "unknown threshold rule"),
]


def _expand(args: list[str], work: Path) -> list[str]:
    return [a.format(work=work, store=work / "s.h5") for a in args]


@pytest.mark.parametrize("args, code, message", USAGE + LIBRARY, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_wrong_invocations_get_one_clear_message_and_exit_code(work, args, code, message):
    done = run_cli(*_expand(args, work))
    output = done.stdout + done.stderr
    assert "Traceback" not in output
    assert done.returncode == code, output
    assert message in output, output
    if (args, code, message) in LIBRARY:
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr


@pytest.mark.parametrize("name, change, message", RUN_JSON, ids=[case[0] for case in RUN_JSON])
def test_a_damaged_run_json_is_one_line_naming_it(work, name, change, message):
    run = broken_run(work, name, change)
    commands = (["evaluate", run], ["predict", run, work / "s.h5"], ["compare", run])
    for args in [commands[[case[0] for case in RUN_JSON].index(name) % 3]]:  # one subprocess per variant, all commands covered
        done = run_cli(*args)
        assert "Traceback" not in done.stderr and done.returncode == 2, done.stderr
        assert str(run / "run.json") in done.stderr and message in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1


def test_manifest_check_exits_one_on_errors(work):
    done = run_cli("manifest", "check", work / "m.csv")
    assert done.returncode == 1 and "duplicate" in done.stdout.lower() and "Traceback" not in done.stderr


def test_evaluate_and_compare_a_fitted_run_through_the_entry_point(work):
    done = run_cli("evaluate", work / "run", "--bootstrap", "0")
    assert done.returncode == 0 and "auroc" in done.stdout, done.stderr
    done = run_cli("compare", work / "run", "--out", work / "table.md")
    assert done.returncode == 0 and "| run |" in done.stdout.lower() or "run" in done.stdout
    assert (work / "table.md").read_text().count("\n") >= 3


def _defaults_in_help(*command: str) -> dict[str, str]:
    text = run_cli(*command, "--help").stdout
    return dict(re.findall(r"(--[a-z0-9-]+)\s.*?\[default: ([^\]]+)\]", text))


@pytest.mark.parametrize(
    "command, classes",
    [
        (("fit",), (FitOptions,)),
        (("extract",), (ExtractOptions,)),
        (("predict",), (ExtractOptions,)),
        (("zeroshot",), (ProtocolOptions, ZeroShotOptions)),
        (("baseline", "cnn"), (CNNOptions, ProtocolOptions)),
        (("baseline", "autoencoder"), (AutoencoderOptions,)),
    ],
)
def test_help_shows_the_option_dataclass_defaults(command, classes):
    from cli._generate import _flags

    shown = _defaults_in_help(*command)
    checked = 0
    for cls in classes:
        for field in dataclasses.fields(cls):
            flag = _flags(field)[0]
            if field.default is dataclasses.MISSING or field.default is None or flag not in shown:
                continue
            expected = field.default
            documented = shown[flag]
            if isinstance(expected, bool):
                name = field.name.replace("_", "-")  # a --x/--no-x pair shows its default as x or no-x
                assert documented.split("/")[0].strip().removeprefix("--") in (name, "True", "False", f"no-{name}")
                assert (documented.removeprefix("--") in ("True", name)) == expected or "/" in documented
            else:
                assert type(expected)(documented) == expected, (flag, documented, expected)
            checked += 1
    assert checked >= 3, shown


def assert_round_trip(run: Path, images: list[Path], tmp_path: Path) -> None:
    """`evaluate`, `compare` and `predict` (to a file and to standard output) accept `run` through the entry point,
    and predict reproduces the run's own test probabilities for the same images."""
    before = json.loads((run / "metrics.json").read_text())
    done = run_cli("evaluate", run)
    assert done.returncode == 0 and "auroc" in done.stdout, done.stdout + done.stderr
    after = json.loads((run / "metrics.json").read_text())
    assert after["image"]["overall"]["auroc"]["value"] == pytest.approx(before["image"]["overall"]["auroc"]["value"], abs=1e-9)
    done = run_cli("compare", run, run)
    assert done.returncode == 0 and "AUROC" in done.stdout, done.stdout + done.stderr
    folder = tmp_path / "images"
    folder.mkdir()
    for image in images:
        shutil.copy(image, folder / image.name)
    done = run_cli("predict", run, folder, "--out", tmp_path / "p.csv")
    assert done.returncode == 0, done.stdout + done.stderr
    expected = {line.split(",")[0]: float(line.split(",")[3]) for line in (run / "predictions.csv").read_text().splitlines()[1:]}
    rows = [line.split(",") for line in (tmp_path / "p.csv").read_text().splitlines()[1:]]
    assert len(rows) == len(images)
    for row in rows:
        image_id = Path(row[0]).stem
        if image_id in expected:
            assert float(row[3]) == pytest.approx(expected[image_id], abs=2e-3), row
    assert any(Path(row[0]).stem in expected for row in rows)
    done = run_cli("predict", run, folder)
    assert done.returncode == 0 and done.stdout.splitlines()[0].startswith("image_id,path"), done.stderr
    assert len(done.stdout.splitlines()) == len(images) + 1


def test_a_head_run_round_trips(work, tmp_path, fracatlas_root):
    from medembed.encoders import get_encoder
    from medembed.options.extract import ExtractOptions
    from medembed.extract.runner import extract
    from medembed.data.manifest import build_fracatlas

    manifest, _ = build_fracatlas(fracatlas_root)
    small = manifest.subset(np.r_[np.flatnonzero(manifest.label == 1)[:9], np.flatnonzero(manifest.label == 0)[:9]])
    small = Manifest({**small.columns, "split": np.array(["train", "val", "test"] * 6, dtype=object)})
    options = {"size": 64}
    extract(small, fracatlas_root, get_encoder("efficientnet-lite0", **options), tmp_path / "s.h5",
            ExtractOptions(batch_size=8, num_workers=0), encoder_options=options)
    fit_run([tmp_path / "s.h5"], tmp_path / "run", FitOptions(n_resamples=0))
    test = small.subset(small.split == "test")
    assert_round_trip(tmp_path / "run", test.resolve(fracatlas_root)[:3], tmp_path)


@pytest.mark.parametrize("delay", [0.8, 1.5, 2.2])  # once the interpreter runs medembed code (site.py can take 0.3 s on two busy cores)
def test_ctrl_c_at_any_point_of_start_up_is_one_line_and_exit_130(delay):
    """SIGINT while the interpreter, typer or the command's libraries are still importing: the handler is first."""
    import signal
    import time

    env = {key: value for key, value in os.environ.items() if key != "MEDEMBED_DEBUG"}
    # SIGINT back to its default in the child: a test runner started in the background of a shell without job
    # control inherits it ignored, and a process that starts with SIGINT ignored rightly keeps ignoring it.
    process = subprocess.Popen([MEDEMBED, "encoders", "check", "-e", "efficientnet-lite0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, (out, err)
    assert err.strip().splitlines() == ["interrupted: work already written is kept; rerun the same command to resume"]
    assert "Traceback" not in out + err


def test_every_switch_can_be_turned_off():
    """A boolean option whose default is true is useless without its --no- form (baseline cnn --augment)."""
    from medembed.options.baselines import CNNOptions as cnn_options

    from medembed.options.transfer import TransferOptions

    switches = {("baseline", "cnn"): cnn_options, ("extract",): ExtractOptions, ("evaluate",): TransferOptions}
    for command, cls in switches.items():
        shown = run_cli(*command, "--help").stdout
        names = [f.name.replace("_", "-") for f in dataclasses.fields(cls) if f.type in (bool, "bool") and f.metadata.get("cli", True)]
        assert names, command
        for name in names:
            assert re.search(rf"--{name}\s+--no-{name}\b", shown), (command, name)


def test_a_seed_given_as_a_head_parameter_is_one_line_naming_seed(work):
    done = run_cli("fit", work / "s.h5", "-p", "seed=3", "--out", work / "seeded")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: -p seed=...: a scorer's seed is fit's --seed (with --seeds N: seed..seed+N-1), not a -p parameter"
    ], done.stderr
