"""Help as a user reads it, through the installed entry point: each command lists only the options it uses,
positional placeholders are written one way, and `medembed heads` lists every head's -p parameters and defaults
as the head classes declare them."""

import dataclasses
import inspect
import json
import re
import subprocess
import sys

import pytest
import typer.main

from cli._generate import _flags
from cli.main import app
from medembed.options.extract import (
    EVALUATE_EXTRACT_SKIPS,
    PREDICT_EXTRACT_SKIPS,
    ExtractOptions,
)
from medembed.scorers.options import HEAD_NAMES, TOKEN_HEADS
from tests.cli.test_entry_point import run_cli

EXTRACT_ONLY = ("--dtype", "--precision", "--limit", "--retry-failed", "--profile")


def flags_in_help(*command: str) -> set[str]:
    done = run_cli(*command, "--help")
    assert done.returncode == 0, done.stderr
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", done.stdout))


@pytest.mark.parametrize("command, skips", [("evaluate", EVALUATE_EXTRACT_SKIPS), ("predict", PREDICT_EXTRACT_SKIPS)])
def test_evaluate_and_predict_list_only_the_extract_options_that_re_reading_with_a_run_uses(command, skips):
    shown = flags_in_help(command)
    for field in dataclasses.fields(ExtractOptions):
        flag = _flags(field)[0]
        assert (flag in shown) == (field.name not in skips), (command, flag)
    assert not shown & set(EXTRACT_ONLY), shown & set(EXTRACT_ONLY)
    assert {"--batch-size", "--workers", "--device"} <= shown
    assert ("--allow-absolute" in shown) == (command == "evaluate")  # evaluate --corrupt reads a manifest under --root
    assert "--out" in shown if command == "predict" else "--out" not in shown
    assert "profile.json" not in run_cli(command, "--help").stdout


def test_extract_still_lists_every_extract_option():
    shown = flags_in_help("extract")
    assert {_flags(field)[0] for field in dataclasses.fields(ExtractOptions)} <= shown


def walk(command, path=()):
    """(path, click command) of every leaf command of the tree."""
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from walk(sub, (*path, name))
    else:
        yield path, command


def test_every_positional_argument_has_an_uppercase_placeholder():
    tree = typer.main.get_command(app)
    seen = 0
    for path, command in walk(tree):
        for parameter in command.params:
            if parameter.param_type_name == "argument":
                assert parameter.metavar and parameter.metavar == parameter.metavar.upper(), (path, parameter.name, parameter.metavar)
                seen += 1
    assert seen >= 15


@pytest.mark.parametrize("command", [("extract",), ("manifest", "check"), ("fit",), ("predict",), ("info",), ("heads",)])
def test_usage_lines_write_placeholders_in_capitals(command):
    done = run_cli(*command, "--help")
    usage = next(line for line in done.stdout.splitlines() if "Usage:" in line)
    placeholders = re.findall(r"\{([^}]*)\}|\[([A-Za-z]+)\]", usage.split("[OPTIONS]")[1])
    names = [a or b for a, b in placeholders]
    assert names and all(name == name.upper() for name in names), usage


def head_classes() -> dict[str, type]:
    from medembed.scorers.heads import make_head
    from medembed.scorers.study_pooling import make_study_pooling

    classes = {name: type(make_head(name)) for name in (*HEAD_NAMES, *TOKEN_HEADS)}
    classes["sklearn:MODULE.CLASS"] = type(make_head("sklearn:sklearn.linear_model.LogisticRegression"))
    classes["study-pooling attention"] = type(make_study_pooling("attention", {}, 0))
    return classes


def test_heads_lists_every_head_with_its_constructor_defaults():
    done = run_cli("heads", "--json")
    assert done.returncode == 0, done.stderr
    entries = json.loads(done.stdout)
    names = [entry["name"] for entry in entries]
    assert names == ["logreg", "mlp", "xgboost", "sklearn:MODULE.CLASS", "attention", "concat", "adapter", "attention"]
    assert entries[-1]["fit"] == "medembed fit --study-pooling attention"
    classes = head_classes()
    for entry, key in zip(entries, [*names[:-1], "study-pooling attention"]):
        signature = inspect.signature(classes[key].__init__).parameters
        for parameter, default in entry["parameters"].items():
            expected = signature[parameter].default
            assert default == (list(expected) if isinstance(expected, tuple) else expected), (key, parameter)
        listed = set(entry["parameters"]) | set(entry["set_by_fit"])
        hidden = {"estimator", "estimator_params"} if key.startswith("sklearn") else set()
        assert listed | hidden == set(signature) - {"self"}, key  # every constructor argument is accounted for
        assert "seed" in entry["set_by_fit"]


def test_heads_prints_copyable_p_lines_and_filters_by_name():
    attention = run_cli("heads", "attention").stdout  # the token head and the study pooling of that name
    assert attention.startswith("attention: ") and attention.count("\n\nattention: ") == 1 and "logreg" not in attention
    assert "medembed fit --study-pooling attention" in attention and "-p max_epochs=60" in attention
    assert "-p n_jobs=null" in attention and "-p l2_normalize=false" in attention
    from typer.testing import CliRunner

    # in-process from here: a listing pays seconds of torch and scikit-learn imports, loaded in this process already
    svc = CliRunner().invoke(app, ["heads", "sklearn:sklearn.svm.SVC"]).output
    assert "-p C=1.0" in svc and "-p kernel=rbf" in svc and "-p standardize=true" in svc
    assert re.search(r"set by fit: .*random_state", svc), svc
    wrong = CliRunner().invoke(app, ["heads", "nope"])
    assert wrong.exit_code == 2 and "no head 'nope'" in wrong.output


def test_fit_help_points_at_medembed_heads():
    assert "medembed heads" in run_cli("fit", "--help").stdout


def test_the_cli_modules_import_neither_the_heads_nor_torch():
    script = (
        "import sys, medembed.cli.app, medembed.cli.heads_cmds\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'sklearn', 'scipy', 'matplotlib', 'xgboost')"
        " or m.startswith(('medembed.scorers.heads', 'medembed.scorers.study_pooling'))]\n"
        "print(heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd="/", check=False)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
