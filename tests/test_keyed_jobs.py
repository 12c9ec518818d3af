"""core.jobs.KeyedJobs: the background computations the Investigate page polls (explanations)."""

from __future__ import annotations

import threading

import pytest

from core import jobs as jobs_module
from core.jobs import KeyedJobs


def test_one_job_per_key_failures_kept_until_the_ttl_and_old_results_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    jobs = KeyedJobs(keep=2, ttl_s=60.0)
    calls: list[str] = []
    release = threading.Event()

    def compute(name: str, fail: bool = False):
        def run():
            release.wait(5)
            calls.append(name)
            if fail:
                raise RuntimeError(f"{name} failed")
            return name

        return run

    assert jobs.peek(("a",)) is None
    first = jobs.get(("a",), compute("a"))
    assert jobs.get(("a",), compute("a-again")) is first and not first.done()  # still running
    release.set()
    assert first.result(timeout=5) == "a" and jobs.peek(("a",)) is first
    assert calls == ["a"]  # the second get did not start another computation

    failed = jobs.get(("b",), compute("b", fail=True))
    assert isinstance(failed.exception(timeout=5), RuntimeError)
    # the page shows the failure; asking again does not loop into a new attempt at once
    assert jobs.peek(("b",)) is failed and jobs.get(("b",), compute("b2")) is failed

    jobs.get(("c",), compute("c")).result(timeout=5)  # keep=2: the oldest key goes
    assert jobs.peek(("a",)) is None

    now = jobs_module.time.monotonic()
    monkeypatch.setattr(jobs_module.time, "monotonic", lambda: now + 61.0)
    assert jobs.peek(("c",)) is None  # older than the ttl: computed again on the next visit
    retried = jobs.get(("b",), compute("b2"))  # a failure too is tried again after the ttl
    assert retried is not failed and retried.result(timeout=5) == "b2"
