"""A bounded-frequency runner: the sync loop's scheduler.

A port of upstream's ``pkg/util/async/bounded_frequency_runner.go``. ``run()`` asks for a
run of ``fn`` as soon as possible; requests are coalesced, runs are at least
``min_interval`` apart (except for up to ``burst`` runs in quick succession: a token
bucket refilled at one token per ``min_interval``), and ``fn`` runs at least once per
``max_interval`` even if nobody asks. ``retry_after(interval)`` asks for a run no later
than ``interval`` from now (used when a sync failed).

Time comes from an injected :class:`Clock`, so tests drive the runner with
:class:`FakeClock` and never sleep.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["BoundedFrequencyRunner", "Clock", "FakeClock", "SystemClock"]

log = logging.getLogger(__name__)


class Clock(Protocol):
    """Time as the runner sees it."""

    def now(self) -> float:
        """Monotonic time in seconds."""
        ...

    def wait(self, cond: threading.Condition, timeout: float) -> None:
        """Block on ``cond`` (held by the caller) until notified or until ``timeout``
        seconds of this clock's time have passed. May return early."""
        ...


class SystemClock:
    """The real monotonic clock."""

    def now(self) -> float:
        return time.monotonic()

    def wait(self, cond: threading.Condition, timeout: float) -> None:
        cond.wait(None if math.isinf(timeout) else max(timeout, 0.0))


class FakeClock:
    """A clock that moves only when told to (``advance``/``set``); for tests.

    Waiters blocked in :meth:`wait` are woken when the fake time reaches their deadline.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()
        self._waiters: dict[int, tuple[threading.Condition, float]] = {}
        self._next_id = 0

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` and wake the waiters whose deadline passed."""
        with self._lock:
            self._now += seconds
            due = [c for c, deadline in self._waiters.values() if deadline <= self._now]
        # notify outside our lock: the waiter holds its condition while taking ours
        for cond in due:
            with cond:
                cond.notify_all()

    def wait(self, cond: threading.Condition, timeout: float) -> None:
        with self._lock:
            if timeout <= 0:
                return
            key = self._next_id
            self._next_id += 1
            self._waiters[key] = (cond, self._now + timeout)
        try:
            # advance() must take cond to notify, and we hold it until wait() releases it
            # atomically, so no wake-up is lost. No real timeout: fake time decides.
            cond.wait()
        finally:
            with self._lock:
                del self._waiters[key]


class _TokenBucket:
    """Upstream's flowcontrol token bucket: ``burst`` tokens, refilled at ``qps``."""

    def __init__(self, qps: float, burst: int, now: float) -> None:
        self.qps = qps
        self.burst = float(max(burst, 1))
        self.tokens = self.burst
        self.last = now

    def _refill(self, now: float) -> None:
        if now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.qps)
            self.last = now

    def try_accept(self, now: float) -> bool:
        self._refill(now)
        if self.tokens >= 1.0 - 1e-9:  # tolerate float rounding of the refill
            self.tokens = max(self.tokens - 1.0, 0.0)
            return True
        return False

    def time_to_token(self, now: float) -> float:
        self._refill(now)
        return max((1.0 - self.tokens) / self.qps, 0.0)


class BoundedFrequencyRunner:
    """Runs ``fn`` on request, at most every ``min_interval`` (after ``burst`` runs) and at
    least every ``max_interval``.

    Call :meth:`loop` in one thread; :meth:`run` and :meth:`retry_after` from any thread
    (including from inside ``fn``). ``fn`` runs in the loop thread, never concurrently
    with itself; an exception from ``fn`` is logged and the loop goes on.
    """

    def __init__(
        self,
        name: str,
        fn: Callable[[], object],
        min_interval: float,
        max_interval: float,
        burst: int = 2,
        clock: Clock | None = None,
    ) -> None:
        if max_interval < min_interval:
            raise ValueError(
                f"{name}: max_interval ({max_interval}) must be >= min_interval ({min_interval})"
            )
        if min_interval < 0:
            raise ValueError(f"{name}: min_interval must be >= 0")
        self.name = name
        self._fn = fn
        self.min_interval = min_interval
        self.max_interval = max_interval
        self._clock: Clock = clock if clock is not None else SystemClock()
        now = self._clock.now()
        self._limiter = _TokenBucket(1.0 / min_interval, burst, now) if min_interval > 0 else None
        self._cond = threading.Condition()
        self._run_requested = False
        self._retry_at: float | None = None
        self._retry_requested = False
        self._deadline = math.inf  # when the timer fires; inf = stopped
        self._last_run = -math.inf
        self._waiting = False
        self._running = False
        self.runs = 0  #: completed runs of fn (for tests and debugging)

    # -- requests (any thread) ------------------------------------------------------------

    def run(self) -> None:
        """Request a run as soon as allowed. Requests made before it runs coalesce."""
        with self._cond:
            self._run_requested = True
            self._cond.notify_all()

    def retry_after(self, interval: float) -> None:
        """Make sure ``fn`` runs again no later than ``interval`` seconds from now (still
        subject to ``min_interval``). The earliest of several requests wins."""
        with self._cond:
            at = self._clock.now() + interval
            if self._retry_at is not None and self._retry_at <= at:
                return
            self._retry_at = at
            self._retry_requested = True
            self._cond.notify_all()

    # -- the loop (one thread) ------------------------------------------------------------

    def loop(self, stop: threading.Event) -> None:
        """Run until ``stop`` is set. Returns promptly after ``stop`` is set, once any
        run of ``fn`` in progress has finished."""

        def wake_on_stop() -> None:
            stop.wait()
            with self._cond:
                self._cond.notify_all()

        threading.Thread(target=wake_on_stop, name=f"{self.name}-stop", daemon=True).start()
        log.debug("%s: loop running", self.name)
        with self._cond:
            self._deadline = self._clock.now() + self.max_interval
            while not stop.is_set():
                now = self._clock.now()
                if self._run_requested:
                    self._run_requested = False
                    self._try_run(now)
                elif self._retry_requested:
                    self._retry_requested = False
                    self._do_retry(now)
                elif now >= self._deadline:
                    self._deadline = math.inf  # the timer fired
                    self._try_run(now)
                else:
                    self._waiting = True
                    self._cond.notify_all()  # for wait_idle()
                    try:
                        self._clock.wait(self._cond, self._deadline - now)
                    finally:
                        self._waiting = False
            self._deadline = math.inf
            self._cond.notify_all()
        log.debug("%s: loop stopping", self.name)

    # called with self._cond held
    def _try_run(self, now: float) -> None:
        if self._limiter is None or self._limiter.try_accept(now):
            self._running = True
            self._cond.release()  # run() and retry_after() may be called from fn
            try:
                self._fn()
            except Exception:
                log.exception("%s: run failed", self.name)
            finally:
                self._cond.acquire()
                self._running = False
            self.runs += 1
            self._last_run = self._clock.now()
            self._deadline = self._last_run + self.max_interval
            log.debug("%s: ran, periodic in %ss", self.name, self.max_interval)
            return
        # Throttled: run as soon as the limiter allows (upstream compares against the
        # time since the last run; the bucket knows exactly when the next token comes).
        next_possible = self._limiter.time_to_token(now)
        if now + next_possible < self._deadline:
            self._deadline = now + next_possible
        log.debug("%s: throttled, scheduling run in %ss", self.name, next_possible)

    # called with self._cond held
    def _do_retry(self, now: float) -> None:
        at, self._retry_at = self._retry_at, None
        if at is not None and at < self._deadline:
            log.debug("%s: retrying in %ss", self.name, at - now)
            self._deadline = at

    # -- introspection (tests) ------------------------------------------------------------

    @property
    def next_run_at(self) -> float:
        """When the timer fires next (clock time; ``inf`` when not looping)."""
        with self._cond:
            return self._deadline

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Block (real time, at most ``timeout``) until the loop is waiting with nothing
        to do before its timer fires. For tests with a :class:`FakeClock`."""
        end = time.monotonic() + timeout
        with self._cond:
            while not (
                self._waiting
                and not self._run_requested
                and not self._retry_requested
                and self._clock.now() < self._deadline
            ):
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True
