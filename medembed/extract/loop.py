"""The extractor's overlapped batch loop: decode, copy, preprocess, embed, copy back and write at the same time.

While the model runs batch i, batch i+1 is already crossing the bus (host-to-device from pinned memory on a
side stream) and batch i-1's embeddings are being appended to the store on a writer thread. Batches are
acknowledged (`Ack`: progress and the summary's counts) only once the store has them durably, so a crash,
Ctrl-C or an error on the writer thread loses nothing acknowledged; a store error stops the run with its
one-line message. On a CPU the same loop runs without streams or pinned memory.

`StageTimes` adds up where the time goes (decode wait, H2D, preprocess, model, D2H, write): on CUDA from
events, elsewhere from the wall clock. Stages overlap, so the largest one bounds the run.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medembed.errors import MedembedError

STAGES = ("decode wait", "H2D", "preprocess", "model", "D2H", "write")
WRITE_QUEUE_DEPTH = 4  # batches computed but not yet durable: bounds host memory and what a crash recomputes


@dataclass
class StageTimes:
    """Seconds spent in each stage over a run, and the batches and images they covered."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    batches: int = 0
    images: int = 0

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] += seconds

    def bound(self) -> str:
        """The stage with the most time: in an overlapped loop, the one that limits throughput."""
        return max(STAGES, key=lambda stage: self.seconds[stage])

    def line(self) -> str:
        """E.g. "stages: decode wait 3.1 s, H2D 0.2 s, ..., write 0.4 s (bound by model)"."""
        parts = ", ".join(f"{stage} {self.seconds[stage]:.1f} s" for stage in STAGES)
        return f"stages: {parts} (bound by {self.bound()})"

    def table(self, wall_seconds: float) -> str:
        """The --profile table: per stage its total, per batch and per image, and its share of the wall time."""
        rows = [f"{'stage':<12} {'total s':>9} {'ms/batch':>9} {'ms/image':>9} {'of wall':>8}"]
        for stage in STAGES:
            total = self.seconds[stage]
            per_batch = 1e3 * total / self.batches if self.batches else 0.0
            per_image = 1e3 * total / self.images if self.images else 0.0
            share = total / wall_seconds if wall_seconds > 0 else 0.0
            rows.append(f"{stage:<12} {total:9.2f} {per_batch:9.2f} {per_image:9.3f} {share:8.0%}")
        rows.append(f"{self.batches} batches, {self.images} images, {wall_seconds:.1f} s wall; bound by {self.bound()}")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": dict(self.seconds), "batches": self.batches, "images": self.images, "bound_by": self.bound()}


@dataclass
class Ack:
    """A batch the store holds durably: its embedded rows, failed images (id -> reason), and vanished files."""

    done: int
    failed: dict[str, str]
    vanished: list[str]


@dataclass
class WriteJob:
    """One computed batch on its way to the store. `embeddings`, `tokens` and `finite` are host tensors that
    are complete once `ready` (a CUDA event; None on a CPU) has happened; `release` gives pinned buffers back."""

    rows: list[int]  # positions in the run's manifest of the images embedded
    embeddings: torch.Tensor  # [n, D] float32 (may be longer than rows: a batch padded to a static shape)
    tokens: dict[str, torch.Tensor]
    finite: torch.Tensor  # [n] bool: pooled embedding and every token finite
    failed: dict[str, str]
    vanished: list[str]
    ready: Any = None
    timings: Callable[[], dict[str, float]] | None = None  # stage seconds, readable once `ready` happened
    release: Callable[[], None] | None = None


class DurableWriter:
    """A thread that appends `WriteJob`s to a StoreWriter in order and acknowledges each once it is durable.

    `append(ids, embeddings, columns, failed=..., tokens=...)` is the store's; `ids` and `columns` are the
    run's manifest ids and store columns, indexed by a job's rows. Non-finite rows are recorded as failed,
    their tokens dropped with them. The first exception stops the writing: `submit` and `close` raise it (a
    MedembedError as it is, anything else as a MedembedError naming the store), what was acknowledged stays.
    """

    def __init__(self, append: Callable[..., None], ids: np.ndarray, columns: dict[str, np.ndarray], store: str, stages: StageTimes) -> None:
        self._append, self._ids, self._columns, self._store, self._stages = append, ids, columns, store, stages
        self._jobs: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE_DEPTH)
        self._acks: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._abandon = threading.Event()  # a second Ctrl-C while closing: stop after the append in progress
        self._thread = threading.Thread(target=self._work, name="medembed-store-writer", daemon=True)
        self._thread.start()

    def submit(self, job: WriteJob) -> None:
        """Queue a job (blocks while WRITE_QUEUE_DEPTH jobs wait); raises the writer thread's error if it stopped."""
        while True:
            self._raise_error()
            try:
                self._jobs.put(job, timeout=0.1)
                return
            except queue.Full:
                continue

    def acks(self) -> list[Ack]:
        """The batches acknowledged since the last call (durable in the store)."""
        out = []
        while True:
            try:
                out.append(self._acks.get_nowait())
            except queue.Empty:
                return out

    def close(self, raise_error: bool = True) -> None:
        """Write every queued job (unless the thread failed), stop the thread, and raise its error if it had
        one and `raise_error` (False while another exception is on its way out). A Ctrl-C while waiting
        drops the jobs still queued (they were never acknowledged) and stops after the append in progress."""
        interrupted, stop_sent = False, False
        while self._thread.is_alive():
            try:
                if not stop_sent:
                    self._jobs.put(None, timeout=0.1)
                    stop_sent = True
                self._thread.join(timeout=0.1)
            except queue.Full:
                continue
            except KeyboardInterrupt:
                interrupted, stop_sent = True, False
                self._abandon.set()
                _drained(self._jobs)
        if interrupted:
            raise KeyboardInterrupt
        if raise_error:
            self._raise_error()

    def _raise_error(self) -> None:
        error = self._error
        if error is None:
            return
        if isinstance(error, MedembedError):
            raise error
        raise MedembedError(f"{self._store}: writing to the store failed ({type(error).__name__}: {error}); "
                            "the batches written before are kept: rerun the same command to resume") from error

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None or self._abandon.is_set():
                return
            if self._error is not None:
                continue  # keep taking jobs so a blocked submit sees the error
            try:
                self._write(job)
            except BaseException as error:  # handed to the main thread, which stops the run with it
                self._error = error

    def _write(self, job: WriteJob) -> None:
        if job.ready is not None:
            job.ready.synchronize()
        for stage, seconds in (job.timings() if job.timings else {}).items():
            self._stages.add(stage, seconds)
        count = len(job.rows)
        finite = job.finite[:count].numpy()
        rows = np.asarray(job.rows, dtype=np.intp)
        ids = self._ids[rows]
        failed = dict(job.failed)
        failed.update({str(image_id): "non-finite embedding" for image_id, ok in zip(ids, finite) if not ok})
        keep = rows[finite]
        embeddings = job.embeddings[:count].numpy()[finite]
        tokens = {level: grid[:count].numpy()[finite] for level, grid in job.tokens.items()}
        start = time.perf_counter()
        self._append(self._ids[keep], embeddings, {k: v[keep] for k, v in self._columns.items()}, failed=failed, tokens=tokens)
        self._stages.add("write", time.perf_counter() - start)
        if job.release:
            job.release()
        self._stages.batches += 1
        self._stages.images += count
        self._acks.put(Ack(done=len(keep), failed=failed, vanished=list(job.vanished)))


def _drained(jobs: queue.Queue) -> queue.Queue:
    while True:
        try:
            jobs.get_nowait()
        except queue.Empty:
            return jobs


class PinnedPool:
    """Reusable pinned host buffers by (shape, dtype): a D2H copy needs pinned memory to be asynchronous, and
    pinning is slow. At most WRITE_QUEUE_DEPTH + 2 sets are in use at once (queued, being written, being filled)."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            free = self._free[(tuple(shape), dtype)]
            if free:
                return free.pop()
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def give(self, tensors: Iterable[torch.Tensor]) -> None:
        with self._lock:
            for tensor in tensors:
                self._free[(tuple(tensor.shape), tensor.dtype)].append(tensor)


def timed(batches: Iterable, stages: StageTimes) -> Iterator:
    """The items of `batches`, adding the time spent waiting for each to the "decode wait" stage."""
    iterator = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        finally:
            stages.add("decode wait", time.perf_counter() - start)
        yield item
