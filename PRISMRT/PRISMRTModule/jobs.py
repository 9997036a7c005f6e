"""Long work off the GUI thread: a job runs on a worker thread, reports progress, can be cancelled, and its result is
applied on the GUI thread (MRML and Qt are touched there only).

The GUI polls :meth:`BackgroundJob.poll` from a timer (every few tens of milliseconds); tests poll or
:meth:`BackgroundJob.wait`. PyTorch and SimpleITK release the GIL while they compute, so the GUI stays responsive.
"""

import logging
import threading
import time
from typing import Any, Callable


class JobCancelled(Exception):
    """Raised inside a job's work when it was cancelled (from :meth:`BackgroundJob.progress`)."""


class BackgroundJob:
    """``work(job)`` on a worker thread. The work calls ``job.progress(fraction, text)`` now and then (which raises
    :class:`JobCancelled` once :meth:`cancel` was called) and must not touch MRML or Qt: it returns a result, and
    ``onDone(result)`` applies it on the GUI thread, from :meth:`poll`. Errors go to ``onError(exception)`` and a
    cancellation to ``onCancelled()``, also from :meth:`poll`; exactly one of the three is called, once."""

    def __init__(self, name: str, work: Callable[["BackgroundJob"], Any], onDone=None, onError=None,
                 onCancelled=None):
        self.name = name
        self._work = work
        self._callbacks = {"done": onDone, "error": onError, "cancelled": onCancelled}
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._progress = (None, "")
        self._outcome = None  # ("done", result) | ("error", exception) | ("cancelled", None), set by the worker
        self._delivered = False
        self._thread = threading.Thread(target=self._run, name=f"PRISM-RT {name}", daemon=True)
        self.started = None

    # ---- worker side ---------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            result = self._work(self)
            outcome = ("cancelled", None) if self._cancel.is_set() else ("done", result)
        except JobCancelled:
            outcome = ("cancelled", None)
        except Exception as error:  # reported on the GUI thread; after a cancel (a download stopped) it is the cancel
            outcome = ("cancelled", None) if self._cancel.is_set() else ("error", error)
        with self._lock:
            self._outcome = outcome

    def progress(self, fraction: "float | None" = None, text: str = "") -> None:
        """Report progress (``fraction`` in [0, 1] or None when unknown); raises JobCancelled once cancelled."""
        with self._lock:
            self._progress = (fraction, text)
        if self._cancel.is_set():
            raise JobCancelled

    def isCancelled(self) -> bool:
        """For work that polls rather than reports (e.g. a download's cancel check)."""
        return self._cancel.is_set()

    # ---- GUI side ------------------------------------------------------------------------------------------------
    def start(self) -> "BackgroundJob":
        self.started = time.monotonic()
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the work to stop at its next progress report; its callback is then ``onCancelled``."""
        self._cancel.set()

    @property
    def running(self) -> bool:
        return not self._delivered

    def currentProgress(self) -> tuple:
        with self._lock:
            return self._progress

    def poll(self) -> bool:
        """On the GUI thread: once the work has ended, call its callback (once). Returns True when the job is over."""
        if self._delivered:
            return True
        with self._lock:
            outcome = self._outcome
        if outcome is None:
            return False
        self._delivered = True
        kind, value = outcome
        callback = self._callbacks[kind]
        if callback is None:
            if kind == "error":
                logging.error(f"PRISM-RT: {self.name} failed: {value}")
            return True
        if kind == "cancelled":
            callback()
        else:
            callback(value)
        return True

    def wait(self, timeout: "float | None" = None) -> bool:
        """Block until the work has ended and deliver its callback (tests, and shutdown). True when over."""
        self._thread.join(timeout)
        return self.poll()
