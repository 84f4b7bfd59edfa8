"""One persistent thread for model work, for GUIs (CUDA and cuDNN state is per thread)."""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Callable, Dict, Tuple

from .errors import SAMMed3DError


class SessionWorker:
    """One persistent thread that runs model work for a GUI (CUDA state is per thread).

    ``submit(fn, *args, key=...)`` returns a ``concurrent.futures.Future``; a newer job with the
    same key supersedes a stale one that has not started (its future is cancelled). Jobs that
    accept a ``cancel`` keyword get a ``threading.Event`` set by :meth:`cancel_all` or by a
    superseding job, so long work (several windows) stops between steps.
    """

    def __init__(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sammed3d-worker")
        self._pending: Dict[concurrent.futures.Future, Tuple[object, threading.Event]] = {}
        self._lock = threading.RLock()  # a cancelled future's done-callback runs inside submit()
        self._shut_down = False

    def submit(self, fn: Callable, *args, key: object = None, pass_cancel: bool = False, **kwargs) -> concurrent.futures.Future:
        """Queue ``fn(*args, **kwargs)``; with ``pass_cancel`` it also gets ``cancel=Event``."""
        event = threading.Event()
        if pass_cancel:
            kwargs["cancel"] = event
        with self._lock:
            if self._shut_down:
                raise SAMMed3DError("the model worker was shut down; create a new SessionWorker")
            if key is not None:
                for future, (job_key, old_event) in list(self._pending.items()):
                    if job_key == key:
                        old_event.set()
                        future.cancel()
            future = self._executor.submit(fn, *args, **kwargs)
            self._pending[future] = (key, event)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future) -> None:
        with self._lock:
            self._pending.pop(future, None)

    def cancel_all(self) -> None:
        """Cancel queued jobs and ask running ones to stop."""
        with self._lock:
            jobs = list(self._pending.items())
        for future, (_key, event) in jobs:
            event.set()
            future.cancel()

    def shutdown(self) -> None:
        """Refuse new jobs, cancel queued ones and ask the running one to stop. Returns at once,
        never waiting for the running job (it ends on the worker thread at its next cancel check;
        its future still completes)."""
        with self._lock:
            self._shut_down = True
        self.cancel_all()
        self._executor.shutdown(wait=False, cancel_futures=True)
