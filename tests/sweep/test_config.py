"""The sweep config: a valid file parses to typed specs; every mistake names the file and the key."""

from pathlib import Path

import pytest

from medembed.sweep import SweepConfigError, load_config

VALID = """
name = "tiny"
manifest = "m.csv"
root = "${SWEEP_TEST_ROOT:-images}"
out = "${SWEEP_TEST_OUT}/sweep"
budgets = [0.1, 1.0]
seeds = [0, 1]
heads = ["logreg", "xgboost"]
threshold = "sensitivity:0.9"
bootstrap = 50

[head_params.xgboost]
n_estimators = 20

[extract]
batch_size = 8

[[encoders]]
name = "efficientnet-lite0"
label = "effl0-64"
options = { size = 64 }

[[encoders]]
name = "efficientnet-lite0"
store = "given.h5"

[[baselines]]
kind = "cnn"
options = { size = 64, epochs = 1 }
budgets = [0.5, 1.0]

[[baselines]]
kind = "autoencoder"
options = { size = 32 }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    return path


def test_a_valid_config(tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEP_TEST_OUT", "/tmp/outs")
    monkeypatch.delenv("SWEEP_TEST_ROOT", raising=False)
    config = load_config(write(tmp_path, VALID))
    assert (config.name, config.manifest, config.root, config.out) == ("tiny", Path("m.csv"), Path("images"), Path("/tmp/outs/sweep"))
    assert config.budgets == (0.1, 1.0) and config.seeds == (0, 1) and config.heads == ("logreg", "xgboost")
    assert config.head_params == {"logreg": {}, "xgboost": {"n_estimators": 20}}
    assert (config.threshold, config.calibration, config.aggregation, config.bootstrap) == ("sensitivity:0.9", "none", "mean", 50)
    assert config.extract.batch_size == 8
    assert [(e.label, e.options, e.store) for e in config.encoders] == [
        ("effl0-64", {"size": 64}, None), ("efficientnet-lite0", {}, Path("given.h5"))
    ]
    cnn, autoencoder = config.baselines
    assert (cnn.label, cnn.options, cnn.budgets, cnn.seeds) == ("cnn", {"size": 64, "epochs": 1}, (0.5, 1.0), (0, 1))
    assert (autoencoder.label, autoencoder.options) == ("autoencoder", {"size": 32})


@pytest.mark.parametrize(
    "change, message",
    [
        (("bootstrap = 50", "bootstrap = 50\nbudget = [0.5]"), "unknown key.*budget.*top level"),
        (("budgets = [0.1, 1.0]", "budgets = [0.1, 1.5]"), r"budgets: budget 1.5 must be .*\(0, 1\]"),
        (("budgets = [0.1, 1.0]", "budgets = [0, 1.0]"), "budgets: budget 0"),
        (("budgets = [0.1, 1.0]", "budgets = [0.1, 0.1]"), "budgets: repeats"),
        (("budgets = [0.1, 1.0]", "budgets = []"), "budgets: must list"),
        (('heads = ["logreg", "xgboost"]', 'heads = ["logreg", "svm"]'), "heads: unknown head 'svm'"),
        (('heads = ["logreg", "xgboost"]', ""), "heads: is required"),
        (("seeds = [0, 1]", "seeds = [0, -1]"), "seeds: expected an integer >= 0"),
        (('threshold = "sensitivity:0.9"', 'threshold = "best"'), "threshold: unknown threshold rule"),
        (("bootstrap = 50", 'bootstrap = 50\ncalibration = "beta"'), "calibration: 'beta' is not one of"),
        (("n_estimators = 20", "n_trees = 20"), r"head_params.xgboost: unknown parameter"),
        (("[head_params.xgboost]", "[head_params.mlp]"), "head_params.mlp: 'mlp' is not one of the sweep's heads"),
        (("batch_size = 8", "limit = 8"), r"unknown key.*limit.*\[extract\]"),
        (('name = "efficientnet-lite0"\nlabel', 'name = "resnet"\nlabel'), r"encoders\[0\].name: unknown encoder 'resnet'"),
        (('label = "effl0-64"', 'label = "effl0-64"\npath = "x"'), r"unknown key.*path.*encoders\[0\]"),
        (('label = "effl0-64"', 'label = "cnn"'), r"encoders\[0\].label: 'cnn'"),
        (('label = "effl0-64"', 'label = "efficientnet-lite0"'), "efficientnet-lite0 appears twice"),
        (('kind = "cnn"', 'kind = "vit"'), r"baselines\[0\].kind: unknown baseline 'vit'"),
        (("epochs = 1 }", "epochs = 1, seed = 3 }"), r"unknown key.*seed.*baselines\[0\].options \(cnn\)"),
        (("options = { size = 32 }", "options = { size = 32 }\nbudgets = [1.0]"), r"unknown key.*budgets.*baselines\[1\] \(autoencoder\)"),
        (('manifest = "m.csv"', "manifest = 3"), "manifest: expected a string, got 3"),
        (("bootstrap = 50", "bootstrap = true"), "bootstrap: expected an integer"),
    ],
)
def test_mistakes_name_the_key(tmp_path, monkeypatch, change, message):
    monkeypatch.setenv("SWEEP_TEST_OUT", "/tmp/outs")
    old, new = change
    assert old in VALID
    path = write(tmp_path, VALID.replace(old, new, 1))
    with pytest.raises(SweepConfigError, match=message) as error:
        load_config(path)
    assert str(path) in str(error.value)


def test_unset_environment_variable_without_default(tmp_path, monkeypatch):
    monkeypatch.delenv("SWEEP_TEST_OUT", raising=False)
    with pytest.raises(SweepConfigError, match="out: environment variable SWEEP_TEST_OUT is not set"):
        load_config(write(tmp_path, VALID))


def test_unreadable_files(tmp_path):
    with pytest.raises(SweepConfigError, match="no such sweep config"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(SweepConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "name = "))
    with pytest.raises(SweepConfigError, match="at least one"):
        load_config(write(tmp_path, 'manifest = "m.csv"\nout = "o"\nheads = ["logreg"]'))


def test_defaults_are_fits(tmp_path):
    from medembed.scorers.options import FitOptions

    config = load_config(write(tmp_path, 'manifest = "m.csv"\nout = "o"\nheads = ["mlp"]\n[[encoders]]\nname = "efficientnet-lite0"'))
    defaults = FitOptions()
    assert (config.threshold, config.calibration, config.aggregation, config.bootstrap) == (
        defaults.threshold, defaults.calibration, defaults.aggregation, defaults.n_resamples
    )
    assert (config.name, config.root, config.budgets, config.seeds, config.baselines) == ("sweep", None, (1.0,), (0,), ())


LABELLED_BASELINES = """
manifest = "m.csv"
out = "o"
heads = ["logreg"]
seeds = [0, 1]

[[encoders]]
name = "efficientnet-lite0"

[[baselines]]
kind = "cnn"
label = "cnn-128"

[[baselines]]
kind = "cnn"
label = "cnn-224"
options = { size = 224, epochs = 10 }
seeds = [0]

[[baselines]]
kind = "autoencoder"
"""


def test_baselines_of_one_kind_under_their_own_labels(tmp_path):
    config = load_config(write(tmp_path, LABELLED_BASELINES))
    assert [(b.kind, b.label, b.options, b.seeds) for b in config.baselines] == [
        ("cnn", "cnn-128", {}, (0, 1)), ("cnn", "cnn-224", {"size": 224, "epochs": 10}, (0,)), ("autoencoder", "autoencoder", {}, ()),
    ]
    assert [b.label for b in config.baselines_of("cnn")] == ["cnn-128", "cnn-224"]


@pytest.mark.parametrize(
    "change, message",
    [
        (('label = "cnn-128"', 'label = "cnn-224"'), r"baselines: cnn-224 appears twice; give each encoder and baseline a distinct `label`"),
        (('label = "cnn-128"\n', ""), None),  # one unlabelled CNN beside a labelled one is fine
        (('label = "cnn-128"', 'label = "efficientnet-lite0"'), r"baselines: efficientnet-lite0 appears twice"),
        (('label = "cnn-128"', 'label = "autoencoder"'), r"baselines\[0\].label: 'autoencoder' must be .* not another baseline's name \(autoencoder\)"),
        (('label = "cnn-128"', 'label = "cnn 128"'), r"baselines\[0\].label: 'cnn 128' must be letters"),
        (('kind = "autoencoder"', 'kind = "autoencoder"\nlabel = "cnn"'), r"baselines\[2\].label: 'cnn' must be"),
    ],
)
def test_baseline_labels_are_checked_as_encoder_labels_are(tmp_path, change, message):
    old, new = change
    assert old in LABELLED_BASELINES
    path = write(tmp_path, LABELLED_BASELINES.replace(old, new, 1))
    if message is None:
        assert [b.label for b in load_config(path).baselines_of("cnn")] == ["cnn", "cnn-224"]
        return
    with pytest.raises(SweepConfigError, match=message) as error:
        load_config(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_two_unlabelled_baselines_of_one_kind_are_refused(tmp_path):
    twice = LABELLED_BASELINES.replace('label = "cnn-128"\n', "").replace('label = "cnn-224"\n', "")
    with pytest.raises(SweepConfigError, match=r"baselines: cnn appears twice"):
        load_config(write(tmp_path, twice))
