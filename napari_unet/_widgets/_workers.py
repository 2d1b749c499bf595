"""Run the core's generators in napari thread workers."""

from __future__ import annotations

from typing import Any, Callable, Generator


class JobFailed(Exception):
    """A ``RuntimeError`` raised inside a job, re-raised as a plain exception.

    superqt treats a ``RuntimeError`` coming out of a worker as "the worker was deleted" and
    neither emits ``errored`` nor ``finished``; wrapping it keeps the dock's state consistent.
    """

    def __init__(self, original: BaseException):
        super().__init__(str(original))
        self.original = original


def _guarded(job: Generator[Any, None, Any]) -> Generator[Any, None, Any]:
    try:
        result = yield from job
    except RuntimeError as err:
        raise JobFailed(err) from err
    return result


def start_job(job: Generator[Any, None, Any], *, on_yield: Callable[[Any], None],
              on_return: Callable[[Any], None], on_error: Callable[[BaseException], None],
              on_finish: Callable[[], None], on_abort: Callable[[], None] | None = None) -> Any:
    """Run ``job`` (a core generator) in a napari ``GeneratorWorker``; callbacks run on the main thread.

    ``worker.quit()`` stops the job at its next yield; the generator is then closed (its
    ``finally`` blocks run) and ``on_abort`` / ``on_finish`` are called.
    """
    from napari.qt.threading import create_worker

    worker = create_worker(_guarded, job, _ignore_errors=True, _start_thread=False)
    worker.yielded.connect(on_yield)
    worker.returned.connect(on_return)

    def errored(err: BaseException) -> None:
        on_error(err.original if isinstance(err, JobFailed) else err)

    worker.errored.connect(errored)

    def aborted() -> None:
        job.close()  # the worker thread has left the loop: safe to close here
        if on_abort is not None:
            on_abort()

    worker.aborted.connect(aborted)
    worker.finished.connect(on_finish)
    worker.start()
    return worker
