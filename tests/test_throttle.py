"""The log throttle: one line per key per period, counting what it held back."""

from wgpunch.throttle import Throttle


def test_throttle_allows_one_line_per_period_and_counts_the_rest():
    throttle = Throttle(60.0)
    assert throttle.allow("10.0.0.9", 0.0) == 0
    assert throttle.allow("10.0.0.9", 1.0) is None
    assert throttle.allow("10.0.0.8", 1.0) == 0  # another source has its own budget
    assert throttle.allow("10.0.0.9", 59.9) is None
    assert throttle.allow("10.0.0.9", 60.0) == 2
    assert throttle.reset("10.0.0.9") == 0
