"""Faults injected around the installed `medembed` entry point (subprocesses), on real FracAtlas images with a tiny
encoder (`efficientnet-lite0 --option size=64`): a disk that fills up while the write-ahead log is appended
and while it is folded (a tmpfs mounted by the test; skipped where mounting is not permitted), bit flips in
the `.h5` (embeddings and label chunks) and in the `.wal`, and Ctrl-C (SIGINT) in the middle of an
extraction.

For each: no traceback, a one-line error naming the file and the problem, the documented exit code, and the
store on disk intact afterwards: after a rerun `verify()` finds nothing, no id twice, every row acknowledged
before the fault still there with the same vector, and the store equal to an uninterrupted run's.

The scenarios are independent chains of subprocesses; two run side by side (CI has 2 cores). Every
`medembed` call is also written to the ledger `tests/reliability/summary.py` counts (env
MEDEMBED_RELIABILITY_LEDGER), with the data checks' findings (rows lost, rows silently wrong).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest

from medembed.store import open_store
from medembed.store.wal import _RECORD_HEAD, _RECORD_MAGIC

MEDEMBED = Path(sys.executable).parent / "medembed"
ENCODER = ["--encoder", "efficientnet-lite0", "--option", "size=64", "--workers", "0"]
ENV = {**os.environ, "PYTHONIOENCODING": "utf-8", "NO_COLOR": "1", "COLUMNS": "200"}
LEDGER = os.environ.get("MEDEMBED_RELIABILITY_LEDGER")


@dataclass
class Run:
    """One finished `medembed` call: its arguments, exit code and output."""

    case: str
    args: list[str]
    rc: int
    stdout: str
    stderr: str
    seconds: float = 0.0

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def messages(self) -> list[str]:
        """stderr lines that are not a progress bar (tqdm redraws with carriage returns)."""
        lines = [line for part in self.stderr.split("\n") for line in part.split("\r")]
        return [line for line in lines if line.strip() and not any(bar in line for bar in ("img/s", "s/img", "?img"))]

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.messages if line.startswith(("error:", "interrupted:"))]


def _ledger(entry: dict) -> None:
    if LEDGER:
        with open(LEDGER, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def medembed(case: str, *args: str | Path, timeout: int = 300) -> Run:
    args = [str(a) for a in args]
    start = time.perf_counter()
    result = subprocess.run([str(MEDEMBED), *args], capture_output=True, text=True, encoding="utf-8", env=ENV, timeout=timeout)
    return Run(case, args, result.returncode, result.stdout, result.stderr, time.perf_counter() - start)


def record(run: Run, *, expected_rc: int, names: str | None = None, problem: str | None = None, problems: int = 0) -> None:
    """The ledger entry of one call, judged: exit code, traceback, one-line error naming `names` and `problem`
    (or, for `info --verify`, `problems` lines "problem: ...", one per problem)."""
    error = run.error_lines
    if problems:
        error = [line for line in run.messages if line.startswith("problem:")]
        one_line = len(error) == problems
    else:
        one_line = len(error) == 1 and (names is None or names in error[0]) and (problem is None or problem in error[0])
    _ledger({
        "what": "call", "case": run.case, "command": "medembed " + " ".join(run.args[:1]), "rc": run.rc,
        "expected_rc": expected_rc, "seconds": round(run.seconds, 1), "traceback": "Traceback" in run.output,
        "one_line_error": one_line if expected_rc not in (0,) and run.rc != 0 else None,
        "error": error[0] if error else "", "messages": run.messages[-6:],
    })


def findings(case: str, *, rows_lost: int, silently_wrong: int, compared: bool = True) -> None:
    """The data checks of a case; `compared`: its store was compared row by row with the uninterrupted run's."""
    _ledger({"what": "data", "case": case, "rows_lost": rows_lost, "silently_wrong": silently_wrong, "compared": compared})


def extract(case: str, manifest: Path, root: Path, store: Path, *extra: str) -> Run:
    return medembed(case, "extract", manifest, "--root", root, *ENCODER, *extra, "--out", store)


def _snapshot(path: Path) -> dict[str, tuple]:
    """id -> (embedding, label, split, ...) of every row a reader sees (committed or still in the log)."""
    table = open_store(path).read()
    return {
        image_id: (table.embeddings[k].astype(np.float32), *(table.columns[c][k] for c in sorted(table.columns)))
        for k, image_id in enumerate(table.image_id)
    }


def compare(case: str, store: Path, reference: Path, acknowledged: dict[str, tuple] | None = None) -> None:
    """The store after a rerun: verify() clean, no id twice, the acknowledged rows unchanged, equal to `reference`."""
    opened = open_store(store)
    assert opened.verify() == [], opened.verify()
    assert opened.pending_rows == 0
    with h5py.File(store, "r") as f:
        ids = f["image_id"].asstr()[:]
    assert len(ids) == len(set(ids)), "an id is stored twice"
    got, want = _snapshot(store), _snapshot(reference)
    lost = set(want) - set(got) | (set(acknowledged or ()) - set(got))
    wrong = {
        image_id for image_id in set(got) & set(want)
        if got[image_id][1:] != want[image_id][1:]
        or not np.allclose(got[image_id][0], want[image_id][0], rtol=2e-3, atol=2e-3)
    }
    wrong |= {
        image_id for image_id, row in (acknowledged or {}).items()
        if image_id in got and not (np.array_equal(got[image_id][0], row[0]) and got[image_id][1:] == row[1:])
    }
    findings(case, rows_lost=len(lost), silently_wrong=len(wrong | (set(got) - set(want))))
    assert not lost, f"rows lost: {sorted(lost)}"
    assert not wrong, f"rows differ from the uninterrupted run: {sorted(wrong)}"
    assert set(got) == set(want) and opened.failed() == open_store(reference).failed()


# ------------------------------------------------------------------------------------------ the faults


class Mount:
    """A tmpfs of `size` at `path` (unmounted by `close`); `skip` says why none could be mounted."""

    def __init__(self, path: Path, size: str) -> None:
        self.path, self.skip = path, ""
        path.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
        except FileNotFoundError:
            self.skip = "no mount command on this machine"
            return
        if done.returncode:
            self.skip = f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}; needs root or CAP_SYS_ADMIN)"

    def resize(self, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True, capture_output=True)

    def close(self) -> None:
        if not self.skip:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@dataclass
class Scenario:
    """What one fault chain left for the tests to check."""

    runs: dict[str, Run] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)
    acknowledged: dict[str, tuple] = field(default_factory=dict)
    skip: str = ""


def disk_full(case: str, folder: Path, manifest: Path, root: Path, size: str, copy_wal_to: Path | None = None) -> Scenario:
    """Extract into a tmpfs of `size` until it is full; what the store holds then; more room; rerun."""
    scenario = Scenario()
    mount = Mount(folder / "tmpfs", size)
    if mount.skip:
        scenario.skip = mount.skip
        return scenario
    try:
        store = mount.path / "store.h5"
        scenario.runs["full"] = extract(case, manifest, root, store)
        scenario.acknowledged = _snapshot(store)
        scenario.paths["left"] = folder / "left"  # the store as the failed run left it, for the tests to inspect
        shutil.copytree(mount.path, scenario.paths["left"])
        if copy_wal_to is not None:  # the same store copied elsewhere (its log still unfolded)
            shutil.copytree(mount.path, copy_wal_to)
        mount.resize("16m")
        scenario.runs["rerun"] = extract(case, manifest, root, store)
        scenario.paths["after"] = folder / "after"
        shutil.copytree(mount.path, scenario.paths["after"])
    finally:
        mount.close()
    return scenario


def flip_bit(path: Path, offset: int, bit: int = 3) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def wal_records(path: Path) -> list[tuple[int, int, int]]:
    """(start, body start, end) of each record of a write-ahead log."""
    data, records, offset = path.read_bytes(), [], 0
    while offset < len(data):
        magic, head_len, body_len, _ = _RECORD_HEAD.unpack_from(data, offset)
        assert magic == _RECORD_MAGIC
        body = offset + _RECORD_HEAD.size + head_len
        records.append((offset, body, body + body_len))
        offset = body + body_len
    return records


def damaged_wal(case: str, folder: Path, manifest: Path, root: Path) -> Scenario:
    """A store whose log (a fold that ran out of space left it) has one record's embeddings flipped."""
    scenario = Scenario()
    store = folder / "store.h5"
    records = wal_records(store.with_name("store.h5.wal"))
    _, body, end = records[1]
    flip_bit(store.with_name("store.h5.wal"), (body + end) // 2)
    scenario.acknowledged = _snapshot(store)  # what a reader sees now: the damaged record's rows are missing
    scenario.runs["info"] = medembed(case, "info", store, "--verify")
    scenario.runs["rerun"] = extract(case, manifest, root, store)
    scenario.paths["store"] = store
    return scenario


def damaged_h5(case: str, folder: Path, reference: Path) -> Scenario:
    """The uninterrupted store with one bit flipped inside the embeddings data and one inside the labels."""
    scenario = Scenario()
    store = folder / "flipped.h5"
    shutil.copyfile(reference, store)
    with h5py.File(store, "r") as f:
        embeddings = f["embeddings"].id.get_chunk_info(0)
        label = f["label"].id.get_chunk_info(0)
    flip_bit(store, embeddings.byte_offset + 1000)
    flip_bit(store, label.byte_offset + 5)
    scenario.runs["info"] = medembed(case, "info", store, "--verify")
    scenario.runs["fit"] = medembed(case, "fit", store, "--head", "logreg", "--bootstrap", "10", "--out", folder / "run")
    scenario.paths.update(store=store, run=folder / "run")
    return scenario


def interrupted(case: str, folder: Path, manifest: Path, root: Path) -> Scenario:
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) once the first batches are in the log."""
    scenario = Scenario()
    store = folder / "store.h5"
    wal = store.with_name("store.h5.wal")
    args = [str(MEDEMBED), "extract", str(manifest), "--root", str(root), *ENCODER, "--batch-size", "1", "--out", str(store)]
    # As from a terminal: SIGINT not ignored (a background job of a shell, e.g. `pytest &`, inherits it ignored,
    # and Python then installs no KeyboardInterrupt handler), the process leading its own group.
    default_sigint = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
    with open(folder / "out.txt", "w+") as out, open(folder / "err.txt", "w+") as err:
        process = subprocess.Popen(
            [sys.executable, "-c", default_sigint, *args], stdout=out, stderr=err, env=ENV, start_new_session=True
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if wal.exists() and len(wal_records(wal)) >= 3:  # three images acknowledged
                break
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGINT)
        rc = process.wait(timeout=120)
        out.seek(0), err.seek(0)
        scenario.runs["interrupted"] = Run(case, args[1:], rc, out.read(), err.read())
    scenario.acknowledged = _snapshot(store)
    scenario.runs["rerun"] = extract(case, manifest, root, store)
    scenario.paths["store"] = store
    return scenario


@pytest.fixture(scope="module")
def faults(small_manifest, fracatlas_root, tmp_path_factory) -> dict[str, Scenario]:
    """Every scenario, run as two chains side by side; name -> Scenario (or the exception it raised)."""
    if not MEDEMBED.is_file():
        pytest.skip(f"no medembed entry point at {MEDEMBED} (pip install -e . first)")
    base = tmp_path_factory.mktemp("faults")
    manifest, root = small_manifest, fracatlas_root
    reference = base / "reference" / "store.h5"
    reference.parent.mkdir()
    results: dict[str, Scenario | BaseException] = {}

    def chain_one() -> None:
        run = extract("uninterrupted", manifest, root, reference)
        results["reference"] = Scenario(runs={"run": run}, paths={"store": reference})
        for name, job in (
            ("h5_bit_flips", lambda: damaged_h5("h5_bit_flips", base, reference)),
            ("sigint", lambda: interrupted("sigint", _mkdir(base / "sigint"), manifest, root)),
        ):
            try:
                results[name] = job()
            except BaseException as error:  # reported by the test that needs it
                results[name] = error

    def chain_two() -> None:
        copy = base / "wal_flip"
        for name, job in (
            ("disk_full_log", lambda: disk_full("disk_full_log", _mkdir(base / "full_log"), manifest, root, "40k")),
            ("disk_full_fold", lambda: disk_full("disk_full_fold", _mkdir(base / "full_fold"), manifest, root, "96k", copy_wal_to=copy)),
            ("wal_bit_flip", lambda: damaged_wal("wal_bit_flip", copy, manifest, root) if copy.exists() else Scenario(skip=results["disk_full_fold"].skip)),
        ):
            try:
                results[name] = job()
            except BaseException as error:
                results[name] = error

    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(chain_one), pool.submit(chain_two)]:
            future.result()
    return results


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _get(faults: dict, name: str) -> Scenario:
    reference = faults["reference"].runs["run"]
    assert reference.rc == 0 and "Traceback" not in reference.output, reference.output[-3000:]
    scenario = faults[name]
    if isinstance(scenario, BaseException):
        raise scenario
    if scenario.skip:
        pytest.skip(scenario.skip)
    return scenario


def _assert_clean(run: Run, expected_rc: int) -> None:
    assert "Traceback" not in run.output, run.output[-3000:]
    assert run.rc == expected_rc, f"exit {run.rc}, expected {expected_rc}: {run.output[-3000:]}"


def test_the_uninterrupted_run(faults):
    run = faults["reference"].runs["run"]
    record(run, expected_rc=0)
    _assert_clean(run, 0)
    assert open_store(faults["reference"].paths["store"]).verify() == []


def test_disk_full_while_the_log_is_appended(faults):
    scenario = _get(faults, "disk_full_log")
    full, rerun = scenario.runs["full"], scenario.runs["rerun"]
    wal = str(scenario.paths["left"].parent / "tmpfs" / "store.h5.wal")
    record(full, expected_rc=2, names=wal, problem="No space left on device")
    record(rerun, expected_rc=0)
    _assert_clean(full, 2)
    assert full.error_lines == [
        f"error: {wal}: cannot append to the write-ahead log (No space left on device); the rows written before are "
        "kept: make room and rerun the same command to resume"
    ], full.messages
    left = scenario.paths["left"] / "store.h5"
    assert 0 < len(scenario.acknowledged) < 24, "the disk must fill up in the middle of the run"
    assert open_store(left).verify() == [] and not (scenario.paths["left"] / "store.h5.tmp").exists()
    _assert_clean(rerun, 0)
    compare("disk_full_log", scenario.paths["after"] / "store.h5", faults["reference"].paths["store"], scenario.acknowledged)


def test_disk_full_while_the_log_is_folded(faults):
    """It segfaulted (exit 139) in HDF5 before the fold reserved its space."""
    scenario = _get(faults, "disk_full_fold")
    full, rerun = scenario.runs["full"], scenario.runs["rerun"]
    store = str(scenario.paths["left"].parent / "tmpfs" / "store.h5")
    record(full, expected_rc=2, names=store, problem="No space left on device")
    record(rerun, expected_rc=0)
    _assert_clean(full, 2)
    (line,) = full.error_lines
    assert line.startswith(f"error: {store}: cannot fold the write-ahead log into the store (No space left on device"), line
    left = open_store(scenario.paths["left"] / "store.h5")
    assert left.committed_rows == 0 and left.pending_rows == 24 == len(scenario.acknowledged)  # all in the log
    assert left.verify() == [] and not (scenario.paths["left"] / "store.h5.tmp").exists()
    _assert_clean(rerun, 0)
    assert "0 embedded, 26 skipped" in rerun.output  # the rerun only folded
    compare("disk_full_fold", scenario.paths["after"] / "store.h5", faults["reference"].paths["store"], scenario.acknowledged)


def test_bit_flips_in_the_h5_are_found_and_refused(faults):
    scenario = _get(faults, "h5_bit_flips")
    info, fit = scenario.runs["info"], scenario.runs["fit"]
    store = str(scenario.paths["store"])
    record(info, expected_rc=1, problems=2)
    record(fit, expected_rc=2, names=store, problem="damaged")
    _assert_clean(info, 1)
    problems = [line for line in info.messages if line.startswith("problem:")]
    assert len(problems) == 2, info.output
    assert problems[0].startswith("problem: 'embeddings' rows 0-") and "damaged" in problems[0]
    assert problems[1].startswith("problem: 'label' rows 0-") and "damaged" in problems[1]
    assert info.stdout.rstrip().endswith("verify       2 problem(s)")
    assert "damaged      " in info.stdout and "cannot read 'label'" in info.stdout  # the summary says so, verify goes on
    _assert_clean(fit, 2)
    (line,) = fit.error_lines
    assert line.startswith(f"error: {store}: cannot read ") and "the file is damaged" in line, line
    assert not scenario.paths["run"].exists()  # no run directory from damaged embeddings
    findings("h5_bit_flips", rows_lost=0, silently_wrong=0, compared=False)  # found and refused, nothing read wrong


def test_a_bit_flip_in_the_log_is_found_and_its_rows_embedded_again(faults):
    scenario = _get(faults, "wal_bit_flip")
    info, rerun = scenario.runs["info"], scenario.runs["rerun"]
    record(info, expected_rc=1, problems=1)
    record(rerun, expected_rc=0)
    _assert_clean(info, 1)
    problems = [line for line in info.messages if line.startswith("problem:")]
    assert len(problems) == 1 and problems[0].startswith("problem: write-ahead log store.h5.wal: 1 damaged record(s) ("), info.output
    assert problems[0].endswith("skipped; their rows are re-embedded by rerunning the extraction"), problems
    assert "damaged write-ahead-log record(s) skipped" in info.stdout
    assert len(scenario.acknowledged) == 20  # 24 rows in 6 records; a reader skips the damaged record's 4
    _assert_clean(rerun, 0)
    assert "4 embedded, 22 skipped" in rerun.output, rerun.output
    compare("wal_bit_flip", scenario.paths["store"], faults["reference"].paths["store"], scenario.acknowledged)


def test_ctrl_c_during_extract_exits_130_and_the_rerun_resumes(faults):
    scenario = _get(faults, "sigint")
    interrupted, rerun = scenario.runs["interrupted"], scenario.runs["rerun"]
    record(interrupted, expected_rc=130, problem="interrupted")
    record(rerun, expected_rc=0)
    _assert_clean(interrupted, 130)
    assert 3 <= len(scenario.acknowledged) < 24, "the interrupt must land in the middle of the run"
    _assert_clean(rerun, 0)
    compare("sigint", scenario.paths["store"], faults["reference"].paths["store"], scenario.acknowledged)
    assert interrupted.error_lines == ["interrupted: work already written is kept; rerun the same command to resume"], interrupted.messages
