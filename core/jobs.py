"""Background jobs for the dashboard: a small thread-safe registry of running and finished jobs.

Training and rescoring take minutes; run in the page's script thread they would freeze that
analyst's session (and hold nothing else up only because the work opens the database briefly).
A job runs in a daemon thread, reports (progress, message) through a callback, and ends as
``done`` with its result or ``failed`` with a one-line message — never a traceback on a page.
Pages poll snapshots (``JobState`` is frozen), so no caller ever sees a half-updated job.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

JobStatus = Literal["running", "done", "failed"]
# progress in [0, 1] (None = not known yet), and a short message for the page
Report = Callable[[float | None, str], None]

log = logging.getLogger(__name__)


class JobBusyError(RuntimeError):
    """A job of the same group (e.g. the same database) is still running."""


@dataclass(frozen=True)
class JobState:
    """A snapshot of one job."""

    job_id: str
    kind: str
    title: str
    group: str | None
    status: JobStatus
    progress: float | None
    message: str
    started_at: datetime
    finished_at: datetime | None = None
    error: str | None = None
    result: Any = None

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def elapsed_s(self) -> float:
        end = self.finished_at or datetime.now(UTC)
        return (end - self.started_at).total_seconds()


def error_message(exc: BaseException) -> str:
    """One line for the page. Our own errors (StoreError, ValueError, ...) already read as
    sentences; anything else keeps its type name so it can be looked up."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, (ValueError, LookupError, OSError)) or type(exc).__module__.startswith(
        "core."
    ):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class JobRegistry:
    """Start jobs in threads and keep their latest state; safe to share across sessions."""

    def __init__(self, keep_finished: int = 20) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, JobState] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._ids = itertools.count(1)
        self._keep_finished = keep_finished

    def start(
        self,
        kind: str,
        title: str,
        work: Callable[[Report], Any],
        *,
        group: str | None = None,
        on_finish: Callable[[JobState], None] | None = None,
    ) -> JobState:
        """Run ``work(report)`` in a new thread. At most one job per ``group`` runs at a time
        (JobBusyError otherwise). ``on_finish`` runs in the job's thread once it ended, also
        when it failed, before the final state is published (e.g. to clear caches, so a page
        that sees "done" reads fresh data); its own errors are logged, not raised."""
        with self._lock:
            if group is not None:
                busy = next(
                    (j for j in self._jobs.values() if j.group == group and j.running), None
                )
                if busy is not None:
                    raise JobBusyError(
                        f"'{busy.title}' is still running ({busy.elapsed_s:.0f} s so far); "
                        "wait for it to finish"
                    )
            job_id = f"job-{next(self._ids)}"
            state = JobState(
                job_id=job_id,
                kind=kind,
                title=title,
                group=group,
                status="running",
                progress=None,
                message="starting…",
                started_at=datetime.now(UTC),
            )
            self._jobs[job_id] = state
            thread = threading.Thread(
                target=self._run, args=(job_id, work, on_finish), name=job_id, daemon=True
            )
            self._threads[job_id] = thread
            self._prune()
        thread.start()
        return state

    def _update(self, job_id: str, **changes: Any) -> JobState:
        with self._lock:
            state = replace(self._jobs[job_id], **changes)
            self._jobs[job_id] = state
            return state

    def _run(
        self,
        job_id: str,
        work: Callable[[Report], Any],
        on_finish: Callable[[JobState], None] | None,
    ) -> None:
        def report(progress: float | None, message: str) -> None:
            value = None if progress is None else min(max(float(progress), 0.0), 1.0)
            self._update(job_id, progress=value, message=message)

        try:
            result = work(report)
        except Exception as exc:  # a job's failure is its state, shown as a message
            log.exception("job %s failed", job_id)
            changes: dict[str, Any] = {
                "status": "failed",
                "error": error_message(exc),
                "message": "failed",
            }
        else:
            changes = {"status": "done", "progress": 1.0, "result": result}
        with self._lock:
            final = replace(self._jobs[job_id], **changes, finished_at=datetime.now(UTC))
            if final.status == "done" and final.message == "starting…":
                final = replace(final, message="done")
        # before the state is published: whoever sees "done" also sees what on_finish did
        if on_finish is not None:
            try:
                on_finish(final)
            except Exception:
                log.exception("on_finish of job %s failed", job_id)
        with self._lock:
            self._jobs[job_id] = final
            self._threads.pop(job_id, None)
            self._prune()

    def _prune(self) -> None:
        finished = [j for j in self._jobs.values() if not j.running]
        for job in finished[: max(0, len(finished) - self._keep_finished)]:
            del self._jobs[job.job_id]

    def get(self, job_id: str) -> JobState | None:
        with self._lock:
            return self._jobs.get(job_id)

    def jobs(self, *, group: str | None = None) -> list[JobState]:
        """Newest first; all groups when ``group`` is None."""
        with self._lock:
            found = [j for j in self._jobs.values() if group is None or j.group == group]
        return found[::-1]

    def active(self, group: str | None = None) -> JobState | None:
        return next((j for j in self.jobs(group=group) if j.running), None)

    def wait(self, job_id: str, timeout: float | None = None) -> JobState:
        """Block until the job ends (or the timeout passes); return its latest state."""
        with self._lock:
            thread = self._threads.get(job_id)
        if thread is not None:
            thread.join(timeout)
        state = self.get(job_id)
        if state is None:
            raise KeyError(f"no job {job_id}")
        return state


class KeyedJobs:
    """Results computed once per key on one background thread, kept a while (an LRU of
    futures with a ttl): for work a page shows when ready, like an explanation, rather than the
    named, progress-reporting jobs of JobRegistry. Several sessions asking for the same key
    share one computation.
    """

    def __init__(self, keep: int = 32, ttl_s: float = 300.0) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fraudlens-keyed")
        self._jobs: OrderedDict[tuple, tuple[float, Future]] = OrderedDict()
        self._keep = keep
        self._ttl_s = ttl_s  # as the page's other caches: new data shows within minutes
        self._lock = threading.Lock()

    def peek(self, key: tuple) -> Future | None:
        """The job for ``key`` while it runs or until its result (or failure) is older than
        the ttl; None when there is none."""
        with self._lock:
            return self._live(key)

    def _live(self, key: tuple) -> Future | None:
        started, job = self._jobs.get(key, (0.0, None))
        if job is not None and job.done() and time.monotonic() - started > self._ttl_s:
            return None
        return job

    def get(self, key: tuple, compute: Callable[[], Any]) -> Future:
        """The job for ``key``, started now if there is none. A failed job stays (the page
        shows its error) until the ttl: retrying at once would loop, as every finished job
        reruns the page. Looked up and started under one lock: two sessions asking at once
        share one computation."""
        with self._lock:
            job = self._live(key)
            if job is None:
                job = self._pool.submit(compute)
                self._jobs[key] = (time.monotonic(), job)
            self._jobs.move_to_end(key)
            while len(self._jobs) > self._keep:
                self._jobs.popitem(last=False)
            return job


_REGISTRY = JobRegistry()


def registry() -> JobRegistry:
    """The process-wide registry: every dashboard session sees the same jobs."""
    return _REGISTRY


__all__ = [
    "JobBusyError",
    "JobRegistry",
    "JobState",
    "JobStatus",
    "KeyedJobs",
    "Report",
    "error_message",
    "registry",
]
