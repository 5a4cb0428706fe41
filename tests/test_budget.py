"""Token bucket: never more than burst + rate x elapsed, never negative."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeagent.budget import TokenBucket

EPS = 1e-6


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


rates = st.floats(min_value=0, max_value=1000, allow_nan=False) | st.sampled_from([0.0, 0.5, 1.0])
bursts = st.integers(min_value=0, max_value=20)
# (seconds to advance the clock, tokens to take)
operations = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=5, allow_nan=False) | st.just(0.0),
        st.integers(min_value=0, max_value=25),
    ),
    max_size=60,
)


@given(rates, bursts, operations)
def test_takes_never_exceed_burst_plus_refill(
    rate: float, burst: int, ops: list[tuple[float, int]]
) -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate, burst, clock=clock)
    start, taken = clock.now, 0
    for advance, n in ops:
        clock.now += advance
        if bucket.try_take(n):
            taken += n
            assert n <= burst
        assert taken <= burst + rate * (clock.now - start) + EPS
        assert 0 <= bucket.available <= burst


@given(bursts, st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), max_size=40))
def test_rate_zero_allows_exactly_burst_takes(burst: int, advances: list[float]) -> None:
    clock = FakeClock()
    bucket = TokenBucket(0, burst, clock=clock)
    successes = 0
    for advance in [*advances, *([0.0] * (burst + 1))]:
        clock.now += advance
        successes += bucket.try_take()
    assert successes == burst
    assert bucket.available == 0


@given(
    rates,
    bursts,
    st.lists(st.tuples(st.floats(-10, 10, allow_nan=False), st.integers(0, 5)), max_size=60),
)
def test_clock_stepping_back_mints_nothing(
    rate: float, burst: int, ops: list[tuple[float, int]]
) -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate, burst, clock=clock)
    start, latest, taken = clock.now, clock.now, 0
    for step, n in ops:
        clock.now += step
        latest = max(latest, clock.now)
        taken += n if bucket.try_take(n) else 0
        assert taken <= burst + rate * (latest - start) + EPS
        assert bucket.available >= 0


def test_refills_at_rate_up_to_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(2.0, 3, clock=clock)
    assert bucket.available == 3
    assert bucket.try_take(3)
    assert not bucket.try_take()
    clock.now += 0.25
    assert bucket.available == pytest.approx(0.5)
    assert not bucket.try_take()
    clock.now += 0.25
    assert bucket.try_take()
    clock.now += 100
    assert bucket.available == 3  # capped


def test_more_than_burst_never_succeeds() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10.0, 2, clock=clock)
    clock.now += 1000
    assert not bucket.try_take(3)
    assert bucket.available == 2  # a failed take costs nothing
    assert bucket.try_take(0)


@pytest.mark.parametrize(
    ("rate", "burst"), [(-1.0, 1), (float("nan"), 1), (float("inf"), 1), (1.0, -1), (1.0, 1.5)]
)
def test_invalid_parameters(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


def test_negative_take_is_an_error() -> None:
    with pytest.raises(ValueError):
        TokenBucket(1.0, 1).try_take(-1)


def test_default_clock_is_monotonic() -> None:
    bucket = TokenBucket(0.0, 1)
    assert bucket.try_take()
    assert not bucket.try_take()
