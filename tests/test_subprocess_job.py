"""Tests for :mod:`napari_unet.subprocess_job`: a generator whose body runs in a child process.

The jobs below are module-level functions: the child imports them by name.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from napari_unet.progress import drain
from napari_unet.subprocess_job import SubprocessJob, SubprocessJobError, run_in_subprocess


# --- jobs run in the child --------------------------------------------------------------------

def count_job(n: int, scale: int = 1):
    for i in range(n):
        yield i * scale
    return {"pid": os.getpid(), "total": n}


def endless_job(marker: str | None = None):
    """Yields until it is sent "stop", then returns how far it got (like Trainer.run)."""
    i = 0
    try:
        while True:
            command = yield i
            if command == "stop":
                return f"stopped at {i}"
            i += 1
            time.sleep(0.01)
    finally:
        if marker:
            Path(marker).write_text("closed cleanly")


def failing_job(after: int):
    for i in range(after):
        yield i
    raise ValueError(f"bad input after {after}")


class Unpicklable(Exception):
    def __init__(self, a, b):  # pickles as Unpicklable(message) and fails to rebuild
        super().__init__(f"{a}/{b}")


def unpicklable_error_job():
    raise Unpicklable(1, 2)
    yield  # pragma: no cover


def niceness_job():
    yield os.nice(0)


def dying_job():
    yield 1
    os._exit(3)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie counts as gone
    try:
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0
    except OSError:
        return True


# --- tests ------------------------------------------------------------------------------------

def test_yields_the_childs_items_and_returns_its_result():
    job = run_in_subprocess(count_job, 4, scale=10)
    assert isinstance(job, SubprocessJob) and job.pid is None  # nothing starts before next()
    items = []
    result = drain(job, items.append)
    assert items == [0, 10, 20, 30]
    assert result["total"] == 4 and result["pid"] != os.getpid()
    assert job.result == result and not job.running


def test_yield_from_and_decode():
    def outer():
        value = yield from run_in_subprocess(count_job, 2, decode=lambda r: r["total"] * 100)
        return value

    assert drain(outer()) == 200


def test_request_stop_sends_the_stop_command_and_the_job_returns():
    job = run_in_subprocess(endless_job, stop_command="stop")
    seen = []
    for item in job:  # request_stop is thread-safe; here from the iterating thread
        seen.append(item)
        if len(seen) == 3:
            job.request_stop()
    assert seen[:3] == [0, 1, 2] and len(seen) <= 4
    assert job.result == f"stopped at {seen[-1]}"
    assert job.stop_requested and not job.running


def test_request_stop_without_a_command_closes_the_childs_generator(tmp_path):
    marker = tmp_path / "closed.txt"
    job = run_in_subprocess(endless_job, str(marker))
    assert next(job) == 0
    job.request_stop()
    rest = list(job)
    assert len(rest) <= 1
    assert job.result is None
    assert marker.read_text() == "closed cleanly"  # the child's finally blocks ran


def test_close_stops_the_child_without_blocking_and_keeps_its_result():
    job = run_in_subprocess(endless_job, stop_command="stop")
    next(job)
    pid = job.pid
    assert _alive(pid)
    start = time.perf_counter()
    job.close()
    assert time.perf_counter() - start < 0.5  # the child is stopped in the background
    assert job.wait(30)
    assert not _alive(pid)
    assert str(job.result).startswith("stopped at")  # like Trainer.run: the best weights
    with pytest.raises(StopIteration):
        next(job)


def test_close_terminates_a_child_that_does_not_return(tmp_path):
    job = run_in_subprocess(endless_job, grace=0.5)  # no stop command: closing is the stop
    next(job)
    pid = job.pid
    job.close()
    assert job.wait(30) and not _alive(pid)


def test_the_target_must_be_importable_by_the_child():
    def local_job():
        yield 1

    for target in (local_job, lambda: iter(())):
        with pytest.raises(ValueError, match="module-level function"):
            run_in_subprocess(target)


def test_close_before_start_is_harmless():
    job = run_in_subprocess(count_job, 3)
    job.close()
    assert job.pid is None and job.wait(1)


def test_errors_come_back_with_their_type_and_the_childs_traceback():
    job = run_in_subprocess(failing_job, 2)
    assert [next(job), next(job)] == [0, 1]
    with pytest.raises(ValueError, match="bad input after 2") as info:
        next(job)
    assert any("failing_job" in note for note in getattr(info.value, "__notes__", []))
    assert not job.running
    # an error before the first item, as the data checks of a training job
    with pytest.raises(ValueError, match="after 0"):
        drain(run_in_subprocess(failing_job, 0))


def test_an_error_that_cannot_be_rebuilt_is_a_subprocess_job_error():
    with pytest.raises(SubprocessJobError, match="Unpicklable"):
        drain(run_in_subprocess(unpicklable_error_job))


def test_a_child_that_dies_is_an_error_not_a_hang():
    job = run_in_subprocess(dying_job)
    assert next(job) == 1
    with pytest.raises(SubprocessJobError, match="exit code 3"):
        next(job)


@pytest.mark.skipif(not hasattr(os, "nice"), reason="POSIX niceness")
def test_nice_lowers_the_childs_priority():
    mine = os.nice(0)
    assert drain(run_in_subprocess(niceness_job), [].append) is None
    seen = []
    drain(run_in_subprocess(niceness_job, nice=5), seen.append)
    assert seen == [min(19, mine + 5)]


def test_the_parents_main_script_is_not_run_again(tmp_path):
    """A user script without ``if __name__ == "__main__"`` (common for napari scripts) must not
    run a second time in the child."""
    log = tmp_path / "runs.txt"
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        with open({str(log)!r}, "a") as handle:
            handle.write("run\\n")
        from napari_unet.progress import drain
        from napari_unet.subprocess_job import run_in_subprocess
        from tests.test_subprocess_job import count_job
        print(drain(run_in_subprocess(count_job, 2))["total"])
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2"
    assert log.read_text() == "run\n"
