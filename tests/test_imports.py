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
