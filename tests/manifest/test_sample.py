"""`sample_manifest` and `medembed manifest sample`: seeded, stratified (proportional, at least one row per
stratum when n allows), deterministic whatever the row order, every column kept; whole patients with --groups."""

import numpy as np
import pytest

from medembed.data.manifest import Manifest, ManifestError, read_manifest, sample_manifest, write_manifest
from medembed.data.manifest.sample import allocate
from medembed.errors import MedembedError
from medembed.options.manifest import SampleOptions
from tests.manifest.test_split_assign import MAX_GROUP, generated, one_error_line, run_cli, splits_per_group


def with_splits(n: int, seed: int = 0) -> Manifest:
    manifest = generated(n, seed=seed)
    split = np.random.default_rng(seed).choice(["train", "val", "test"], n, p=[0.7, 0.1, 0.2])
    return Manifest({**manifest.columns, "split": split, "note": manifest.image_id + "!"})


@pytest.mark.parametrize("sizes", [[5], [1, 1, 1], [900, 80, 15, 4, 1], [3, 3, 3, 3], list(range(1, 60))])
def test_allocation_sums_to_n_with_one_per_stratum_and_proportional(sizes: list) -> None:
    sizes = np.array(sizes)
    for n in range(1, sizes.sum() + 1, max(1, sizes.sum() // 40)):
        count = allocate(n, sizes)
        assert count.sum() == n and (count <= sizes).all() and (count >= 0).all()
        if n >= len(sizes):
            assert (count >= 1).all()
            big = n * sizes / sizes.sum() >= 1
            if big.all():  # no stratum lifted to its one: plain largest remainder, within one of the quota
                assert (np.abs(count - n * sizes / sizes.sum()) < 1).all()


@pytest.mark.parametrize("n", [1, 7, 300, 5000])
def test_sample_is_stratified_and_keeps_columns(n: int) -> None:
    manifest = with_splits(10_000)
    sample = sample_manifest(manifest, SampleOptions(n=n, stratify="label,split", seed=0))
    assert len(sample) == n and list(sample.columns) == list(manifest.columns)
    assert len(set(sample.image_id)) == n and set(sample.image_id) <= set(manifest.image_id)
    rows = {image: i for i, image in enumerate(manifest.image_id)}
    picked = np.array([rows[image] for image in sample.image_id])
    assert (np.diff(picked) > 0).all()  # in the manifest's order
    assert sample == manifest.subset(picked)
    key, sample_key = manifest.columns["label"] + manifest.split, sample.columns["label"] + sample.split
    strata, sizes = np.unique(key, return_counts=True)
    expected = allocate(n, sizes)
    assert [int(np.sum(sample_key == s)) for s in strata] == expected.tolist()
    if n >= len(strata):
        assert set(sample_key) == set(strata)


def test_deterministic_for_a_seed_whatever_the_row_order() -> None:
    manifest = with_splits(3000, seed=1)
    options = SampleOptions(n=200, seed=4)  # default strata: label and split
    first = sample_manifest(manifest, options)
    assert sample_manifest(manifest, options) == first
    order = np.random.default_rng(2).permutation(len(manifest))
    assert sorted(sample_manifest(manifest.subset(order), options).image_id) == sorted(first.image_id)
    assert sorted(sample_manifest(manifest, SampleOptions(n=200, seed=5)).image_id) != sorted(first.image_id)


def test_groups_take_whole_patients_about_n_rows() -> None:
    manifest = with_splits(8000, seed=3)
    options = SampleOptions(n=500, stratify="label", seed=0, groups=True)
    sample = sample_manifest(manifest, options)
    taken = np.isin(manifest.patient_id, sample.patient_id)
    assert taken.sum() == len(sample)  # every image of a sampled patient
    strata = len(np.unique(manifest.columns["label"]))
    assert abs(len(sample) - 500) <= strata * MAX_GROUP
    assert (splits_per_group(sample.patient_id, sample.columns["label"]) >= 1).all()


def test_whole_manifest_and_too_many() -> None:
    manifest = with_splits(50)
    assert sample_manifest(manifest, SampleOptions(n=50)) == manifest
    with pytest.raises(ManifestError, match="cannot sample 51 rows from a manifest of 50 rows"):
        sample_manifest(manifest, SampleOptions(n=51))
    with pytest.raises(ManifestError, match="no column 'site' to stratify by"):
        sample_manifest(manifest, SampleOptions(n=5, stratify="site"))
    for n in (None, 0, -3):
        with pytest.raises(MedembedError, match="option n"):
            SampleOptions(n=n)


def test_sample_command(tmp_path) -> None:
    source = tmp_path / "big.csv"
    write_manifest(with_splits(4000, seed=6), source)
    out = tmp_path / "small.csv"
    done = run_cli("manifest", "sample", source, "--n", "300", "--stratify", "label,split", "--seed", "0", "--out", out)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out} (300 rows)" in done.stdout
    expected = sample_manifest(read_manifest(source), SampleOptions(n=300, stratify="label,split", seed=0))
    assert read_manifest(out) == expected
    line = one_error_line(run_cli("manifest", "sample", source, "--n", "4001", "--out", out))
    assert line == f"error: {source}: cannot sample 4001 rows from a manifest of 4000 rows"
    line = one_error_line(run_cli("manifest", "sample", source, "--n", "10", "--stratify", "label,site", "--out", out))
    assert line.startswith(f"error: {source}: no column 'site' to stratify by; the manifest has image_id, path, label")
    assert "option n is required" in one_error_line(run_cli("manifest", "sample", source, "--out", out))
