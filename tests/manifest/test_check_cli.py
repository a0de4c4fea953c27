"""`medembed manifest check --decode` through the installed entry point finds what extract would fail on."""

import re

from medembed.data.manifest import read_manifest
from tests.cli.test_entry_point import run_cli
from tests.conftest import TRUNCATED


def test_check_decode_lists_the_truncated_jpegs_extract_fails_on(small_manifest, fracatlas_root):
    headers_only = run_cli("manifest", "check", small_manifest, "--root", fracatlas_root)
    assert headers_only.returncode == 0, headers_only.stdout + headers_only.stderr
    done = run_cli("manifest", "check", small_manifest, "--root", fracatlas_root, "--decode")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    manifest = read_manifest(small_manifest)
    rows = [int(n) for n in re.findall(r"row (\d+) ", done.stdout)]
    assert sorted(manifest.image_id[r - 1] for r in rows) == TRUNCATED
    assert "2 file(s) are not readable images (truncated image data)" in done.stdout


def test_check_help_says_decode_decodes_in_full():
    done = run_cli("manifest", "check", "--help")
    assert "decode every file in full, as extract does" in " ".join(done.stdout.split())
