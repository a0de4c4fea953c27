"""The reliability corpus, written once per session (about a second, under a megabyte)."""

from pathlib import Path

import pytest

from .generators import Case, write_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[Path, list[Case]]:
    """(root, cases): every bad and awkward file of `generators.write_corpus` under one root."""
    root = tmp_path_factory.mktemp("reliability") / "root"
    root.mkdir()
    return root, write_corpus(root)
