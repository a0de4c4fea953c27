"""The overlapped loop's writer thread and stage timings, on a real store (CPU: host tensors, no CUDA events)."""

import numpy as np
import pytest
import torch

from medembed.errors import MedembedError
from medembed.extract.loop import STAGES, DurableWriter, StageTimes, WriteJob
from medembed.store import StoreError, StoreWriter, make_fingerprint, open_store

DIM, LEVEL, SHAPE = 4, "final@2x2", (5, 3)
IDS = np.asarray([f"img{i}" for i in range(8)])
COLUMNS = {"label": np.arange(8) % 2, "split": np.asarray(["train"] * 8)}


def store_writer(path):
    fingerprint = make_fingerprint(encoder="test", model_id="m", embedding_kind="pooled", dtype="float32")
    return StoreWriter(path, dim=DIM, fingerprint=fingerprint, tokens={LEVEL: SHAPE})


def job(rows, finite=None, dim=DIM, failed=None):
    n = len(rows)
    embeddings = torch.arange(n * dim, dtype=torch.float32).reshape(n, dim) + 100 * torch.tensor(rows)[:, None]
    tokens = {LEVEL: torch.full((n, *SHAPE), 0.5) + torch.tensor(rows, dtype=torch.float32)[:, None, None]}
    mask = torch.ones(n, dtype=torch.bool) if finite is None else torch.tensor(finite)
    return WriteJob(list(rows), embeddings, tokens, mask, failed or {}, [])


def test_batches_are_acknowledged_once_durable_and_non_finite_rows_lose_their_tokens(tmp_path):
    stages = StageTimes()
    with store_writer(tmp_path / "s.h5") as writer:
        durable = DurableWriter(writer.append, IDS, COLUMNS, "s.h5", stages)
        durable.submit(job([0, 1, 2]))
        durable.submit(job([3, 4], finite=[True, False], failed={"img7": "truncated JPEG"}))
        durable.close()
        acks = durable.acks()
    assert [(a.done, a.failed) for a in acks] == [(3, {}), (1, {"img7": "truncated JPEG", "img4": "non-finite embedding"})]
    store = open_store(tmp_path / "s.h5")
    table = store.read()
    assert table.image_id.tolist() == ["img0", "img1", "img2", "img3"]
    grids = store.read_tokens(LEVEL)
    assert grids.shape == (4, *SHAPE) and grids[:, 0, 0].tolist() == [0.5, 1.5, 2.5, 3.5]  # img4's grid dropped with it
    assert store.failed() == {"img7": "truncated JPEG", "img4": "non-finite embedding"}
    assert table.columns["label"].tolist() == [0, 1, 0, 1]
    assert stages.batches == 2 and stages.images == 5 and stages.seconds["write"] > 0


def test_a_store_error_on_the_writer_thread_stops_the_run_and_keeps_what_was_durable(tmp_path):
    with store_writer(tmp_path / "s.h5") as writer:
        durable = DurableWriter(writer.append, IDS, COLUMNS, "s.h5", StageTimes())
        durable.submit(job([0, 1]))
        durable.submit(job([2, 3], dim=DIM + 1))  # the store refuses embeddings of another width
        with pytest.raises(StoreError, match="expected \\(2, 4\\)"):
            for rows in ([4], [5], [6], [7], [4], [5]):  # the error surfaces on a later submit ...
                durable.submit(job(rows))
            durable.close()  # ... or at the latest when the loop closes the writer
        durable.close(raise_error=False)  # what the loop does on its way out: returns, the thread stopped
        assert not durable._thread.is_alive()
        assert [a.done for a in durable.acks()] == [2]
    assert open_store(tmp_path / "s.h5").read().image_id.tolist() == ["img0", "img1"]


def test_other_writer_exceptions_become_one_line_errors_naming_the_store(tmp_path):
    def broken_append(*args, **kwargs):
        raise OSError(28, "No space left on device")

    durable = DurableWriter(broken_append, IDS, COLUMNS, str(tmp_path / "s.h5"), StageTimes())
    durable.submit(job([0]))
    with pytest.raises(MedembedError) as caught:
        durable.close()
    assert "s.h5: writing to the store failed" in str(caught.value) and "\n" not in str(caught.value)


def test_stage_line_and_profile_table_name_the_bounding_stage():
    stages = StageTimes(batches=4, images=32)
    for stage, seconds in zip(STAGES, (3.0, 0.5, 1.0, 6.0, 0.25, 0.5)):
        stages.add(stage, seconds)
    assert stages.line() == "stages: decode wait 3.0 s, H2D 0.5 s, preprocess 1.0 s, model 6.0 s, D2H 0.2 s, write 0.5 s (bound by model)"
    table = stages.table(wall_seconds=8.0).splitlines()
    assert table[0].split() == ["stage", "total", "s", "ms/batch", "ms/image", "of", "wall"]
    assert table[4].split() == ["model", "6.00", "1500.00", "187.500", "75%"]
    assert table[-1] == "4 batches, 32 images, 8.0 s wall; bound by model"
