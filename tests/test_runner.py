"""The bounded-frequency runner, driven by a fake clock (no test sleeps)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from kproxy.runner import BoundedFrequencyRunner, FakeClock, SystemClock


@dataclass
class Harness:
    clock: FakeClock
    runner: BoundedFrequencyRunner
    calls: list[float] = field(default_factory=list)

    def settle(self) -> None:
        assert self.runner.wait_idle(5.0), "runner did not become idle"

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.settle()

    def run(self) -> None:
        self.runner.run()
        self.settle()

    def times(self) -> list[float]:
        """Call times relative to the start."""
        return [round(t - 1000.0, 6) for t in self.calls]


def _start(min_interval: float, max_interval: float, burst: int) -> Iterator[Harness]:
    clock = FakeClock(start=1000.0)
    calls: list[float] = []
    runner = BoundedFrequencyRunner(
        "test", lambda: calls.append(clock.now()), min_interval, max_interval, burst, clock
    )
    h = Harness(clock, runner, calls)
    stop = threading.Event()
    t = threading.Thread(target=runner.loop, args=(stop,), daemon=True)
    t.start()
    h.settle()
    yield h
    stop.set()
    t.join(5.0)
    assert not t.is_alive(), "loop did not stop"


@pytest.fixture
def h() -> Iterator[Harness]:
    """min 1s, max 10s, burst 1."""
    yield from _start(1.0, 10.0, 1)


@pytest.fixture
def hb() -> Iterator[Harness]:
    """min 1s, max 10s, burst 2."""
    yield from _start(1.0, 10.0, 2)


def test_nothing_runs_without_request_before_max_interval(h: Harness) -> None:
    h.advance(9.999)
    assert h.calls == []


def test_runs_immediately_on_first_request(h: Harness) -> None:
    h.run()
    assert h.times() == [0.0]


def test_requests_within_min_interval_coalesce_into_one_deferred_run(h: Harness) -> None:
    h.run()
    h.advance(0.1)
    h.run()
    h.run()
    h.run()
    assert h.times() == [0.0]
    assert h.runner.next_run_at == pytest.approx(1001.0)
    h.advance(0.899)
    assert h.times() == [0.0]
    h.advance(0.001)
    assert h.times() == [0.0, 1.0]
    # the three requests were one run
    h.advance(5)
    assert h.times() == [0.0, 1.0]


def test_min_interval_respected_under_constant_requests(h: Harness) -> None:
    for _ in range(30):
        h.run()
        h.advance(0.25)
    gaps = [b - a for a, b in zip(h.times(), h.times()[1:], strict=False)]
    assert len(h.calls) >= 7
    assert all(g >= 1.0 - 1e-6 for g in gaps), gaps


def test_max_interval_forces_periodic_runs(h: Harness) -> None:
    h.advance(10)
    assert h.times() == [10.0]
    h.advance(10)
    assert h.times() == [10.0, 20.0]


def test_a_run_resets_the_max_interval_timer(h: Harness) -> None:
    h.advance(4)
    h.run()
    h.advance(9.5)
    assert h.times() == [4.0]
    h.advance(0.5)
    assert h.times() == [4.0, 14.0]


def test_burst_allows_quick_runs_then_throttles(hb: Harness) -> None:
    hb.run()
    hb.run()
    assert hb.times() == [0.0, 0.0]
    hb.run()  # third one must wait for a token (1 per min_interval)
    assert hb.times() == [0.0, 0.0]
    hb.advance(1.0)
    assert hb.times() == [0.0, 0.0, 1.0]


def test_burst_tokens_accumulate_while_idle(hb: Harness) -> None:
    hb.run()
    hb.run()
    hb.advance(5)  # refills to the burst size (2), not more
    hb.run()
    hb.run()
    hb.run()
    assert hb.times() == [0.0, 0.0, 5.0, 5.0]
    hb.advance(1)
    assert hb.times() == [0.0, 0.0, 5.0, 5.0, 6.0]


def test_retry_after_schedules_a_run(h: Harness) -> None:
    h.run()
    h.runner.retry_after(3)
    h.settle()
    assert h.runner.next_run_at == pytest.approx(1003.0)
    h.advance(2.999)
    assert h.times() == [0.0]
    h.advance(0.001)
    assert h.times() == [0.0, 3.0]


def test_retry_after_keeps_the_earliest_request(h: Harness) -> None:
    h.run()
    h.runner.retry_after(5)
    h.runner.retry_after(2)
    h.runner.retry_after(4)
    h.settle()
    h.advance(2)
    assert h.times() == [0.0, 2.0]
    h.advance(3)
    assert h.times() == [0.0, 2.0]


def test_retry_after_later_than_timer_changes_nothing(h: Harness) -> None:
    h.run()
    h.runner.retry_after(30)
    h.settle()
    assert h.runner.next_run_at == pytest.approx(1010.0)


def test_retry_is_still_bounded_by_min_interval(h: Harness) -> None:
    h.run()
    h.runner.retry_after(0.1)
    h.settle()
    h.advance(0.1)
    assert h.times() == [0.0]
    h.advance(0.9)
    assert h.times() == [0.0, 1.0]


def test_retry_after_from_inside_fn() -> None:
    clock = FakeClock(start=1000.0)
    calls: list[float] = []
    runner: BoundedFrequencyRunner

    def fn() -> None:
        calls.append(clock.now())
        if len(calls) == 1:
            runner.retry_after(2)

    runner = BoundedFrequencyRunner("t", fn, 1.0, 10.0, 1, clock)
    stop = threading.Event()
    t = threading.Thread(target=runner.loop, args=(stop,), daemon=True)
    t.start()
    assert runner.wait_idle()
    runner.run()
    assert runner.wait_idle()
    clock.advance(2)
    assert runner.wait_idle()
    assert [c - 1000.0 for c in calls] == [0.0, 2.0]
    stop.set()
    t.join(5)
    assert not t.is_alive()


def test_exception_in_fn_does_not_stop_the_loop(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    calls: list[int] = []

    def fn() -> None:
        calls.append(1)
        raise RuntimeError("boom")

    runner = BoundedFrequencyRunner("t", fn, 0.0, 10.0, 1, clock)
    stop = threading.Event()
    t = threading.Thread(target=runner.loop, args=(stop,), daemon=True)
    t.start()
    assert runner.wait_idle()
    runner.run()
    assert runner.wait_idle()
    runner.run()
    assert runner.wait_idle()
    assert len(calls) == 2
    assert "boom" in caplog.text
    stop.set()
    t.join(5)
    assert not t.is_alive()


def test_zero_min_interval_runs_every_request() -> None:
    clock = FakeClock()
    calls: list[float] = []
    runner = BoundedFrequencyRunner("t", lambda: calls.append(clock.now()), 0.0, 5.0, 1, clock)
    stop = threading.Event()
    t = threading.Thread(target=runner.loop, args=(stop,), daemon=True)
    t.start()
    assert runner.wait_idle()
    for _ in range(3):
        runner.run()
        assert runner.wait_idle()
    assert len(calls) == 3
    stop.set()
    t.join(5)


def test_stop_ends_loop_and_no_more_runs() -> None:
    clock = FakeClock()
    calls: list[float] = []
    runner = BoundedFrequencyRunner("t", lambda: calls.append(clock.now()), 1.0, 5.0, 1, clock)
    stop = threading.Event()
    t = threading.Thread(target=runner.loop, args=(stop,), daemon=True)
    t.start()
    assert runner.wait_idle()
    stop.set()
    t.join(5)
    assert not t.is_alive()
    runner.run()
    clock.advance(100)
    assert calls == []
    assert runner.next_run_at == float("inf")


def test_stop_with_real_clock_is_prompt() -> None:
    runner = BoundedFrequencyRunner("t", lambda: None, 1.0, 3600.0, 1, SystemClock())
    stop = threading.Event()
    t = threading.Thread(target=runner.loop, args=(stop,), daemon=True)
    t.start()
    assert runner.wait_idle()
    stop.set()
    t.join(5)  # must not wait for the 1h timer
    assert not t.is_alive()


def test_max_interval_below_min_interval_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_interval"):
        BoundedFrequencyRunner("t", lambda: None, 5.0, 1.0)
