"""--batch-size auto: option checking, the search, its cache (auto on a CPU: tests/test_extract.py through the CLI;
the CUDA forward passes: tests/test_extract_cuda.py, run by gpu_check.sh)."""

import json

import pytest

from medembed.extract.batch_size import cached, largest_batch, rounded
from medembed.errors import MedembedError
from medembed.options.extract import ExtractOptions


@pytest.mark.parametrize("value", [None, "auto", 1, 512])
def test_auto_none_and_positive_integers_are_accepted(value):
    assert ExtractOptions(batch_size=value).batch_size == value


@pytest.mark.parametrize("value", ["big", 0, -3, 2.5, True])
def test_anything_else_is_refused_in_one_line(value):
    with pytest.raises(MedembedError, match="batch_size must be a positive integer or 'auto'"):
        ExtractOptions(batch_size=value)


@pytest.mark.parametrize("largest", [1, 2, 7, 100, 383, 4096])
def test_the_search_finds_the_largest_batch_that_fits_in_few_trials(largest):
    trials = []

    def fits(batch):
        trials.append(batch)
        return batch <= largest

    assert largest_batch(fits, limit=4096) == largest
    assert len(trials) <= 2 * 13 + 1  # doubling then bisection: logarithmic, never a scan


def test_nothing_fitting_is_a_clear_error():
    with pytest.raises(MedembedError, match="not even a batch of 1"):
        largest_batch(lambda batch: False)


def test_rounding_keeps_tensor_core_multiples():
    assert [rounded(b) for b in (1, 7, 8, 15, 383)] == [1, 7, 8, 8, 376]


def test_the_answer_is_cached_per_key_and_a_damaged_cache_is_searched_again(tmp_path):
    path = tmp_path / "cache" / "batch_sizes.json"
    calls = []
    search = lambda: calls.append(1) or 96  # noqa: E731
    assert cached("gpu|model|448px", search, path) == 96
    assert cached("gpu|model|448px", search, path) == 96 and len(calls) == 1
    assert cached("gpu|model|896px", lambda: 24, path) == 24
    assert json.loads(path.read_text()) == {"gpu|model|448px": 96, "gpu|model|896px": 24}
    path.write_text("{not json")
    assert cached("gpu|model|448px", search, path) == 96 and len(calls) == 2

