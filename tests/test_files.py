"""medembed._files: renames made durable (the folder fsync'd), and a run directory swap killed between its two
renames restored on the next read of the run or the next swap, in forked children SIGKILLed at that step."""

import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from medembed._files import (
    atomic_write_json,
    atomic_write_text,
    replaced_directory,
    restore_replaced,
)
from medembed.errors import MedembedError
from medembed.fit import fit_run
from medembed.runs.record import load_run, read_record
from medembed.scorers.options import FitOptions
from tests.test_fit import write_store

SWAP = replaced_directory.__wrapped__.__code__  # the generator contextmanager wraps


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """A real run directory (a logreg head on a small store), copied by each test that changes it."""
    base = tmp_path_factory.mktemp("files")
    fit_run([write_store(base / "s.h5")], base / "run", FitOptions(n_resamples=0))
    return base / "run"


def run_copy(fitted: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(fitted, folder / "run"))


def fsynced(monkeypatch) -> list[tuple[int, int]]:
    """(device, inode) of everything os.fsync is called on from now."""
    seen: list[tuple[int, int]] = []
    real = os.fsync

    def record(fd):
        info = os.fstat(fd)
        seen.append((info.st_dev, info.st_ino))
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return seen


def identity(path: Path) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


def test_an_atomic_write_fsyncs_the_file_and_then_its_folder(tmp_path, monkeypatch):
    seen = fsynced(monkeypatch)
    atomic_write_json(tmp_path / "sub" / "a.json", {"x": 1})
    assert seen[-2:] == [identity(tmp_path / "sub" / "a.json"), identity(tmp_path / "sub")]
    seen.clear()
    atomic_write_text(tmp_path / "sub" / "a.json", "again\n")  # a replace, not a creation: the same
    assert seen[-1] == identity(tmp_path / "sub") and (tmp_path / "sub" / "a.json").read_text() == "again\n"


def test_a_swap_fsyncs_what_it_publishes_and_the_folder_after_the_renames(tmp_path, monkeypatch):
    seen = fsynced(monkeypatch)
    with replaced_directory(tmp_path / "out") as staging:
        (staging / "deep").mkdir()
        (staging / "deep" / "w.bin").write_bytes(b"written without an fsync of its own")
    assert identity(tmp_path / "out" / "deep" / "w.bin") in seen and identity(tmp_path / "out") in seen
    assert seen[-1] == identity(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["out"]


def swap_killed(run: Path, at) -> int:
    """In a forked child, rewrite `run` through replaced_directory (a copy plus a file `new`) and SIGKILL the child
    when `at(event, frame, arg)` first says so; returns the child's pid (asserting it died by the kill)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        def profile(frame, event, arg):
            if at(event, frame, arg):
                os.kill(os.getpid(), signal.SIGKILL)

        try:
            sys.setprofile(profile)
            with replaced_directory(run) as staging:
                shutil.copytree(run, staging, dirs_exist_ok=True)
                (staging / "new").write_text("the new contents\n")
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    return pid


def between_the_renames(event, frame, arg) -> bool:
    """The call that would move staging into place, once the old contents are aside: only `.NAME.old-PID` exists."""
    return event == "c_call" and arg is os.replace and frame.f_code is SWAP and os.path.exists(frame.f_locals["previous"])


@pytest.mark.parametrize("reader", [load_run, read_record])
def test_a_kill_between_the_renames_is_restored_by_the_next_load(fitted, tmp_path, reader):
    run = run_copy(fitted, tmp_path)
    pid = swap_killed(run, between_the_renames)
    assert not run.exists()
    assert (tmp_path / f".run.old-{pid}" / "run.json").is_file()  # the window: only the aside copy
    reader(run)
    assert (run / "run.json").is_file() and not (run / "new").exists()  # the previous run, whole
    assert not (tmp_path / f".run.old-{pid}").exists()
    load_run(run)


def test_the_next_swap_restores_first_then_replaces_and_leaves_nothing_beside(fitted, tmp_path):
    run = run_copy(fitted, tmp_path)
    swap_killed(run, between_the_renames)
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == [".run.new", ".run.old"]  # staging too
    with replaced_directory(run) as staging:
        assert (run / "run.json").is_file()  # restored before the new contents are written
        shutil.copytree(run, staging, dirs_exist_ok=True)
        (staging / "second").write_text("x")
    assert (run / "second").is_file() and not (run / "new").exists()
    assert sorted(os.listdir(tmp_path)) == ["run"]  # the dead writer's staging and aside copy are gone
    load_run(run)


def test_a_kill_after_the_swap_keeps_the_new_run_and_the_next_swap_clears_the_leftover(fitted, tmp_path):
    run = run_copy(fitted, tmp_path)

    def removing_the_aside_copy(event, frame, arg) -> bool:
        called = event == "call" and frame.f_code is shutil.rmtree.__code__ and frame.f_back.f_code is SWAP
        return called and (run / "new").exists()

    pid = swap_killed(run, removing_the_aside_copy)
    assert (run / "new").is_file() and (tmp_path / f".run.old-{pid}").is_dir()
    assert load_run(run).record == read_record(run) and (tmp_path / f".run.old-{pid}").is_dir()  # a reader leaves it
    with replaced_directory(run) as staging:
        (staging / "x").write_text("x")
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_a_live_writers_aside_copy_is_never_touched(fitted, tmp_path):
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        aside = Path(shutil.copytree(fitted, tmp_path / f".run.old-{writer.pid}"))
        mine = Path(shutil.copytree(fitted, tmp_path / f".run.old-{os.getpid()}"))
        assert not restore_replaced(tmp_path / "run")
        with pytest.raises(MedembedError, match="no such run directory"):
            read_record(tmp_path / "run")
        assert aside.is_dir() and mine.is_dir()
    finally:
        writer.kill()
        writer.wait()
    shutil.rmtree(mine)
    assert restore_replaced(tmp_path / "run") and not aside.exists()  # its writer is gone now
    load_run(tmp_path / "run")


def test_an_error_between_the_renames_puts_the_previous_contents_back_at_once(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("kept")
    real, calls = os.replace, []

    def second_fails(source, destination):
        calls.append(destination)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(source, destination)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(KeyboardInterrupt), replaced_directory(target) as staging:
        (staging / "new").write_text("lost")
    assert sorted(os.listdir(target)) == ["old"] and sorted(os.listdir(tmp_path)) == ["out"]


def test_restore_leaves_a_present_target_and_other_names_alone(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / ".run.old-999999999").mkdir()  # a pid no process has, beside a target that is there
    (tmp_path / ".runs.old-999999999").mkdir()  # another target's
    assert not restore_replaced(tmp_path / "run") and (tmp_path / ".run.old-999999999").is_dir()
    assert not restore_replaced(tmp_path / "run2") and not restore_replaced(tmp_path / "missing" / "run")
    assert stat.S_ISDIR(os.stat(tmp_path / ".runs.old-999999999").st_mode)
