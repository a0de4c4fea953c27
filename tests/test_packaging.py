"""pyproject.toml installs what the checkout holds: every package folder of medembed/, and the top-level cli/ folder
as `medembed.cli` (never a top-level `cli`, whose name other projects use), behind the `medembed` entry point."""

import os
import subprocess
import sys
import tomllib

from tests.conftest import REPO


def config() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_package_list_names_every_package_folder_and_cli_as_medembed_cli():
    setuptools = config()["tool"]["setuptools"]
    on_disk = {
        ".".join(folder.relative_to(REPO).parts)
        for folder in (REPO / "medembed").rglob("*")
        if folder.is_dir() and (folder / "__init__.py").is_file()
    } | {"medembed"}
    assert set(setuptools["packages"]) == on_disk | {"medembed.cli"}, set(setuptools["packages"]) ^ (on_disk | {"medembed.cli"})
    assert setuptools["package-dir"] == {"medembed.cli": "cli"}
    assert not any(name == "cli" or name.startswith("cli.") for name in setuptools["packages"])
    assert config()["project"]["scripts"] == {"medembed": "medembed.cli.main:main"}


def test_the_installed_package_is_medembed_cli_and_no_top_level_cli():
    script = (
        "import importlib.util, medembed.cli.main\n"
        "print(importlib.util.find_spec('cli') is None, medembed.cli.main.__name__)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd="/", env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "medembed.cli.main"]
