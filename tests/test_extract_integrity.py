"""The runner's integrity rules on real FracAtlas images: precision in the fingerprint, provenance, missing files,
a wrong root, manifest errors refused up front, and manifest columns refreshed on resume."""

import os

import numpy as np
import pytest
import torch

from medembed.errors import MedembedError
from medembed.options.extract import ExtractOptions
from medembed.encoders.runtime import build_encoder, resolve_precision, store_fingerprint
from medembed.extract.runner import extract
from medembed.data.manifest import Manifest, read_manifest
from medembed.store import StoreWriter, open_store

from tests.conftest import TRUNCATED

ENCODER = {"size": 64}
OPTIONS = ExtractOptions(batch_size=4, num_workers=0)


@pytest.fixture
def six(small_manifest) -> Manifest:
    """Six decodable rows of the small FracAtlas manifest (two per split)."""
    manifest = read_manifest(small_manifest)
    keep = [i for i, image_id in enumerate(manifest.image_id) if image_id not in TRUNCATED]
    picks = []
    for split in ("train", "val", "test"):
        picks += [i for i in keep if manifest.split[i] == split][:2]
    return manifest.subset(np.asarray(picks))


def run(manifest, root, out, options=OPTIONS):
    return extract(manifest, root, build_encoder("efficientnet-lite0", ENCODER), out, options, encoder_options=ENCODER)


def linked_root(tmp_path, manifest, fracatlas_root, rows) -> "os.PathLike":
    """A root holding (symlinks to) only the images of `rows`, at the manifest's relative paths."""
    root = tmp_path / "root"
    for row in rows:
        link = root / manifest.path[row]
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(fracatlas_root / manifest.path[row])
    return root


def test_resolve_precision_and_a_resolved_store_fingerprint():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("auto", cuda) == "bf16"
    assert [resolve_precision(p, cpu) for p in ("bf16", "fp16", "fp32")] == ["bf16", "fp16", "fp32"]
    with pytest.raises(MedembedError, match="precision must be one of auto, bf16, fp16, fp32"):
        resolve_precision("int8", cpu)
    encoder = build_encoder("efficientnet-lite0", ENCODER)
    assert store_fingerprint(encoder, "float16")["precision"] == "fp32"  # the default old call sites get
    fingerprint = store_fingerprint(encoder, "float16", "bf16")
    assert fingerprint["precision"] == "bf16" and fingerprint["config_sha256"] == encoder.config_sha256() != ""
    with pytest.raises(MedembedError, match="resolved precision"):
        store_fingerprint(encoder, "float16", "auto")


def test_the_precision_used_is_recorded_and_a_resume_in_another_is_refused(tmp_path, six, fracatlas_root):
    out = tmp_path / "s.h5"
    first = run(six.subset(np.arange(2)), fracatlas_root, out, ExtractOptions(batch_size=2, num_workers=0, precision="bf16"))
    assert first.precision == "bf16" and first.done == 2
    store = open_store(out)
    assert store.fingerprint["precision"] == "bf16"
    assert store.provenance["gpu"] == "cpu" and store.provenance["torch"].split("+")[0] == torch.__version__.split("+")[0]
    with pytest.raises(MedembedError, match="precision: 'bf16' vs 'fp32'"):
        run(six, fracatlas_root, out)  # auto on a CPU is fp32
    assert len(open_store(out)) == 2
    again = run(six, fracatlas_root, out, ExtractOptions(batch_size=4, num_workers=0, precision="bf16"))
    assert (again.done, again.skipped) == (4, 2)


def test_missing_files_are_retried_not_recorded_and_a_wrong_root_is_refused(tmp_path, six, fracatlas_root):
    out = tmp_path / "s.h5"
    with pytest.raises(MedembedError, match="wrong --root") as error:
        run(six, tmp_path / "nowhere", out)
    message = str(error.value)
    assert str(tmp_path / "nowhere") in message and six.path[0] in message and "\n" not in message
    root = linked_root(tmp_path, six, fracatlas_root, [0, 1, 2, 3])
    first = run(six, root, out)
    assert (first.done, first.failed, first.missing) == (4, 0, 2)
    assert open_store(out).failed() == {}  # a missing file is not a bad image
    assert "2 missing" in first.format() and "the next run tries them again" in first.format()
    # Everything that exists is embedded and only missing files remain: reported again, not refused.
    again = run(six, root, out)
    assert (again.done, again.missing, again.skipped) == (0, 2, 4)
    linked_root(tmp_path, six, fracatlas_root, range(6))  # the files turn up
    last = run(six, root, out)
    assert (last.done, last.missing) == (2, 0) and len(open_store(out)) == 6


def test_a_missing_file_an_earlier_run_recorded_as_failed_is_tried_again(tmp_path, six, fracatlas_root):
    out = tmp_path / "s.h5"
    run(six.subset(np.arange(5)), fracatlas_root, out)
    store = open_store(out)
    with StoreWriter(out, dim=store.dim, fingerprint=store.fingerprint) as writer:  # what the previous medembed did
        writer.add_failed([six.image_id[5]], ["file not found"])
    summary = run(six, fracatlas_root, out)
    assert summary.done == 1 and open_store(out).failed() == {}


def test_manifest_errors_are_refused_before_anything_is_written(tmp_path, six, fracatlas_root):
    out = tmp_path / "s.h5"
    columns = {name: values.copy() for name, values in six.columns.items()}
    columns["image_id"][3] = columns["image_id"][0]
    with pytest.raises(MedembedError, match="duplicate_image_id") as error:
        run(Manifest(columns), fracatlas_root, out)
    assert "rows 1, 4" in str(error.value) and "\n" not in str(error.value)
    columns = {name: values.copy() for name, values in six.columns.items()}
    columns["image_id"][2] = "IMG\x00X"
    with pytest.raises(MedembedError, match=r"row 3 'IMG\\x00X' \(contains a NUL byte\)"):
        run(Manifest(columns), fracatlas_root, out)
    assert not out.exists()


def test_a_resume_refreshes_the_stored_columns_of_an_edited_manifest(tmp_path, six, fracatlas_root):
    out = tmp_path / "s.h5"
    run(six.subset(np.arange(4)), fracatlas_root, out)
    before = open_store(out).read()
    columns = {name: values.copy() for name, values in six.columns.items()}
    columns["label"][0] = "1" if columns["label"][0] == "0" else "0"
    columns["split"][1] = "test"  # rows 0 and 1 are both train: moving one keeps the manifest valid
    columns["body_part"][2] = "elbow"
    edited = Manifest(columns)
    summary = run(edited, fracatlas_root, out)
    assert (summary.done, summary.metadata_updated) == (2, 3)
    assert "3 stored row(s) had their label/split" in summary.format()
    table = open_store(out).read()
    by_id = {i: k for k, i in enumerate(table.image_id)}
    for row in range(6):
        k = by_id[edited.image_id[row]]
        assert table.label[k] == edited.label[row] and table.columns["split"][k] == edited.split[row]
        assert table.columns["body_part"][k] == edited.body_part[row]
    np.testing.assert_array_equal(  # embeddings untouched
        table.embeddings[[by_id[i] for i in before.image_id]], before.embeddings
    )
    assert run(edited, fracatlas_root, out).metadata_updated == 0


def test_absolute_manifest_paths_are_refused_up_front_unless_allowed(tmp_path, six, fracatlas_root):
    columns = {name: values.copy() for name, values in six.columns.items()}
    columns["path"] = np.asarray([str(fracatlas_root / p) for p in six.path], dtype=object)
    absolute = Manifest(columns)
    out = tmp_path / "s.h5"
    with pytest.raises(MedembedError, match="absolute"):
        run(absolute, tmp_path, out)
    assert not out.exists()
    summary = run(absolute.subset(np.arange(2)), tmp_path, out, ExtractOptions(batch_size=2, num_workers=0, allow_absolute=True))
    assert summary.done == 2
