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


def test_a_line_budget_bounds_the_lines_of_many_keys_and_reports_what_it_held():
    throttle = Throttle(60.0, max_lines=2)
    assert [throttle.allow(f"10.0.0.{n}", 1.0) for n in range(5)] == [0, 0, None, None, None]
    assert throttle.allow("10.0.0.0", 30.0) is None  # its own period is not over either
    # A new period: the first line logged reports the three the budget held back.
    assert throttle.allow("10.0.0.4", 61.0) == 3
    assert throttle.allow("10.0.0.0", 61.0) == 1
    assert throttle.allow("10.0.0.5", 61.0) is None
