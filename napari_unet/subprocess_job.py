"""Run a long job (a generator) in a child process, and drive it like the generator itself.

A job run in a thread shares the interpreter lock (GIL) with the GUI: code that holds it for
long delays the Qt event loop, and the two slow each other down. The same job in a child
process cannot (measured for training: ~20% more iterations next to a live napari window; the
GIL gaps themselves stayed < 11 ms, so the Fine-tune dock trains in a thread by default).
:func:`run_in_subprocess` keeps the project's generator contract::

    job = run_in_subprocess(train_job, checkpoint_bytes, pairs, config, stop_command="stop")
    for stats in job:            # the child's progress items, as they come
        ...
    # StopIteration.value / ``yield from`` / ``drain(job)``: the child's result

* ``job.request_stop()`` (thread-safe, e.g. from a Stop button while another thread iterates)
  asks the child to finish early: with ``stop_command`` the child's generator is sent that
  value at its next yield (``Trainer.run`` then returns the best weights, normally);
  without, the child's generator is closed and the job returns ``None``.
* ``job.close()`` (or garbage collection, or napari's ``worker.quit()``) stops the child
  cleanly: a stop request, up to ``grace`` seconds to finish (a training job then still
  delivers its result in ``job.result``), then the child is terminated.
* An exception in the child is raised again in the parent (the same type when it can be
  pickled, else :class:`SubprocessJobError` with the child's traceback); a child that dies
  (killed, out of memory) raises :class:`SubprocessJobError`.

The child is started with the ``spawn`` method (no fork of a threaded GUI process) on the
first ``next()``, i.e. in the thread that drives the job, not in the one that created it.
``target`` must be importable (a module-level function) and its arguments, progress items and
result must pickle; send models as checkpoint bytes (:func:`checkpoint.model_to_bytes`). The
child does not run the parent's ``__main__`` again; ``nice`` lowers its priority before it
imports the target's module.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import pickle
import threading
import time
import traceback
from collections.abc import Generator
from typing import Any, Callable

#: how often the parent checks that a silent child is still alive (seconds)
POLL_INTERVAL = 0.1


class SubprocessJobError(RuntimeError):
    """The child process failed in a way that cannot be re-raised as the original error."""


_SPAWN_LOCK = threading.Lock()


@contextlib.contextmanager
def _main_module_not_rerun() -> Any:
    """Start ``spawn`` children without running the parent's ``__main__`` again in them.

    By default a spawn child re-imports the parent's main script: a user script that opens
    napari at module level (no ``if __name__ == "__main__"``) would open a second viewer in
    the child. Our targets are importable by name, so the child needs nothing from
    ``__main__`` (as for an interactive session, where multiprocessing skips it too).
    """
    from multiprocessing import spawn

    original = spawn.get_preparation_data

    def preparation_data(name: str) -> dict[str, Any]:
        data = original(name)
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
        return data

    with _SPAWN_LOCK:
        spawn.get_preparation_data = preparation_data
        try:
            yield
        finally:
            spawn.get_preparation_data = original


# ----------------------------------------------------------------------------------------------
# child side
# ----------------------------------------------------------------------------------------------

def _send(conn: Any, message: tuple[str, Any]) -> bool:
    """Send to the parent; False when it is gone."""
    try:
        conn.send(message)
        return True
    except (BrokenPipeError, ConnectionResetError, EOFError):
        return False


def _import_target(reference: str) -> Callable[..., Any]:
    module_name, _, qualname = reference.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def _child_main(conn: Any, stop_event: Any, reference: str, payload: bytes, stop_command: Any,
                nice: int) -> None:
    """Entry point of the child: iterate ``target(*args, **kwargs)``, report over ``conn``.

    Only this (light) module is imported before the priority is lowered: the target's module
    and the arguments (whose classes import it) are loaded after, at the lower priority.
    """
    if nice and hasattr(os, "nice"):
        try:
            os.nice(nice)
        except OSError:
            pass
    try:
        target = _import_target(reference)
        args, kwargs = pickle.loads(payload)
        del payload
        job = target(*args, **kwargs)
        stopping = False
        while True:
            if stop_event.is_set() and not stopping:
                stopping = True
                if stop_command is None:
                    job.close()
                    _send(conn, ("return", None))
                    return
                item = job.send(stop_command)
            else:
                item = next(job)
            if not _send(conn, ("yield", item)):  # the parent is gone: stop
                job.close()
                return
    except StopIteration as stop:
        _send(conn, ("return", stop.value))
    except BaseException as err:  # noqa: BLE001 - everything goes back to the parent
        text = "".join(traceback.format_exception(err))
        try:
            pickle.loads(pickle.dumps(err))  # only what the parent can rebuild
        except Exception:  # noqa: BLE001
            err = None
        _send(conn, ("error", (err, text)))
    finally:
        conn.close()


# ----------------------------------------------------------------------------------------------
# parent side
# ----------------------------------------------------------------------------------------------

def _reference(target: Callable[..., Any]) -> str:
    """``module:qualname`` of a module-level function, for the child to import."""
    module, qualname = getattr(target, "__module__", None), getattr(target, "__qualname__", "")
    if not module or module == "__main__" or "<locals>" in qualname or "<lambda>" in qualname:
        raise ValueError(f"{target!r} cannot run in a child process: pass a module-level "
                         "function of an importable module")
    return f"{module}:{qualname}"


class SubprocessJob(Generator):
    """A generator whose body runs in a child process; see the module docstring."""

    def __init__(self, target: Callable[..., Any], args: tuple = (), kwargs: dict | None = None, *,
                 stop_command: Any = None, grace: float = 10.0, nice: int = 0,
                 decode: Callable[[Any], Any] | None = None):
        self._reference = _reference(target)
        self._args = tuple(args)
        self._kwargs = dict(kwargs or {})
        self._stop_command = stop_command
        self._grace = float(grace)
        self._nice = int(nice)
        self._decode = decode
        self._context = multiprocessing.get_context("spawn")
        self._stop_event = self._context.Event()
        self._lock = threading.Lock()
        self._process: Any = None
        self._conn: Any = None
        self._finished = False
        self._reaper: threading.Thread | None = None
        #: the child's (decoded) result once it returned, also after ``close()`` within grace
        self.result: Any = None
        self._gen = self._run()

    # generator protocol -----------------------------------------------------------------------
    def send(self, value: Any) -> Any:
        if (value is not None and type(value) is type(self._stop_command)
                and value == self._stop_command):
            self.request_stop()
        return self._gen.send(None)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if val is None and tb is None:
            return self._gen.throw(typ)
        return self._gen.throw(typ, val, tb)

    def close(self) -> None:
        """Stop the job. Does not block: a running child gets a stop request and ``grace``
        seconds (in a background thread) before it is terminated; :meth:`wait` waits for that."""
        self._gen.close()

    def __del__(self) -> None:
        try:
            self._gen.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the child is gone (after the end or :meth:`close`); True if it is."""
        reaper = self._reaper
        if reaper is not None:
            reaper.join(timeout)
            return not reaper.is_alive()
        return not self.running

    # control ----------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the child to finish at its next progress item (thread-safe)."""
        self._stop_event.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop_event.is_set()

    @property
    def pid(self) -> int | None:
        """The child's process id (None before the first ``next()``)."""
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        process = self._process
        return process is not None and process.is_alive()

    # internals --------------------------------------------------------------------------------
    def _start(self) -> None:
        # the arguments travel as bytes: the child unpickles them after lowering its priority
        payload = pickle.dumps((self._args, self._kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        self._args, self._kwargs = (), {}
        receiver, sender = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_child_main, name=f"napari-unet job ({self._reference})",
            args=(sender, self._stop_event, self._reference, payload, self._stop_command,
                  self._nice),
            daemon=True)
        with self._lock:
            self._conn, self._process = receiver, process
            with _main_module_not_rerun():
                process.start()
        sender.close()  # the child holds the other end: EOF when it is gone

    def _receive(self, timeout: float | None) -> tuple[str, Any] | None:
        """Next message from the child; None when ``timeout`` passes without one."""
        conn, process = self._conn, self._process
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = POLL_INTERVAL if end is None else max(0.0, min(POLL_INTERVAL, end - time.monotonic()))
            try:
                if conn.poll(wait):
                    return conn.recv()
            except (EOFError, OSError):
                process.join(1.0)
                raise SubprocessJobError(
                    f"the background process ended unexpectedly (exit code {process.exitcode})"
                ) from None
            except Exception as err:  # noqa: BLE001 - a message that does not unpickle here
                raise SubprocessJobError(f"unreadable message from the background process: "
                                         f"{type(err).__name__}: {err}") from err
            if not process.is_alive() and not conn.poll(0):
                raise SubprocessJobError(
                    f"the background process ended unexpectedly (exit code {process.exitcode})")
            if end is not None and time.monotonic() >= end:
                return None

    def _finish(self, payload: Any) -> Any:
        self._finished = True
        result = self._decode(payload) if self._decode is not None and payload is not None else payload
        self.result = result
        return result

    def _run(self) -> Generator[Any, Any, Any]:
        self._start()
        try:
            while True:
                kind, payload = self._receive(None)
                if kind == "yield":
                    yield payload
                elif kind == "return":
                    return self._finish(payload)
                else:  # error
                    self._finished = True
                    err, text = payload
                    if isinstance(err, BaseException):
                        err.add_note(f"in the background process:\n{text}")
                        raise err
                    raise SubprocessJobError(f"the background process failed:\n{text}")
        finally:
            if self._finished:  # the child has returned or failed: it is exiting
                self._shutdown()
            else:  # closed, or an error here: stop the child without blocking this thread
                self._reaper = threading.Thread(target=self._shutdown, daemon=True,
                                                name="napari-unet job reaper")
                self._reaper.start()

    def _shutdown(self) -> None:
        """Stop the child: a stop request, ``grace`` seconds to return, then terminate."""
        with self._lock:
            process, conn = self._process, self._conn
        if process is None:
            return
        if process.is_alive() and not self._finished:
            self._stop_event.set()
            end = time.monotonic() + self._grace
            try:
                while process.is_alive() and time.monotonic() < end:
                    message = self._receive(max(0.0, end - time.monotonic()))
                    if message is None:
                        break
                    if message[0] == "return":
                        self._finish(message[1])
                        break
                    if message[0] == "error":
                        break
            except SubprocessJobError:
                pass
        process.join(self._grace if self._finished else 0.5)
        if process.is_alive():
            process.terminate()
            process.join(5.0)
            if process.is_alive():  # pragma: no cover - a child that ignores SIGTERM
                process.kill()
                process.join(5.0)
        try:
            conn.close()
        except OSError:  # pragma: no cover
            pass
        try:
            process.close()
        except ValueError:  # pragma: no cover - still running after kill
            pass
        with self._lock:
            self._process = None


def run_in_subprocess(target: Callable[..., Generator[Any, Any, Any]], *args: Any,
                      stop_command: Any = None, grace: float = 10.0, nice: int = 0,
                      decode: Callable[[Any], Any] | None = None,
                      **kwargs: Any) -> SubprocessJob:
    """Run the generator ``target(*args, **kwargs)`` in a child process (``spawn``).

    Parameters
    ----------
    target
        A module-level generator function (the child imports it by name).
    stop_command
        Value sent into the child's generator when a stop is requested (``"stop"`` for
        :meth:`Trainer.run`, which then returns the best model); None: the child's generator
        is closed and the job returns None.
    grace
        Seconds a closed job gives the child to return before it is terminated.
    nice
        Added to the child's niceness (POSIX): a lower priority than the GUI.
    decode
        Applied in the parent to the child's result (e.g. checkpoint bytes to a model).

    Returns
    -------
    SubprocessJob
        A generator: yields the child's progress items, returns its (decoded) result;
        ``request_stop()`` and ``close()`` as described in the module docstring.
    """
    return SubprocessJob(target, args, kwargs, stop_command=stop_command, grace=grace, nice=nice,
                         decode=decode)
