"""The library imports without the CLI's dependencies: every medembed module, with typer blocked."""

import os
import subprocess
import sys

from tests.conftest import REPO

SCRIPT = """
import importlib, pkgutil, sys
sys.modules["typer"] = None  # any `import typer` now raises ImportError
import medembed
names = [m.name for m in pkgutil.walk_packages(medembed.__path__, "medembed.")]
for name in names:
    importlib.import_module(name)
print(len(names))
"""


def test_every_library_module_imports_without_typer():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) > 20  # the walk found the package's modules


LIGHT = """
import importlib, pkgutil, sys
import medembed.options
names = ["medembed", "medembed.api", "medembed.cli.main", "medembed.cli.app", "medembed.encoders.registry", "medembed.encoders.choice", "medembed.scorers.options"] + [m.name for m in pkgutil.walk_packages(medembed.options.__path__, "medembed.options.")]
for name in names:
    importlib.import_module(name)
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "sklearn", "scipy", "matplotlib", "transformers", "xgboost", "h5py", "mlflow"})
print(len(names))
print(" ".join(heavy) or "none")
"""


def test_the_cli_and_every_option_module_import_without_heavy_libraries():
    """`import medembed` (its Python API loads on first use) and `medembed --help`, which builds every command from
    the option types: none of them may pull torch, scikit-learn, scipy, matplotlib, transformers, XGBoost, h5py or MLflow
    (they are imported where they are used)."""
    done = subprocess.run(
        [sys.executable, "-c", LIGHT], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    count, heavy = done.stdout.strip().splitlines()[-2:]
    assert int(count) >= 14  # medembed and its Python API, medembed.cli.main and .app, the registry, the encoder choice, fit's options and the option modules
    assert heavy == "none", f"imported at start-up: {heavy}"
