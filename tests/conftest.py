"""Lab fixtures: labs with unique prefixes, torn down whatever the test did.

Tests marked `@pytest.mark.lab` are skipped, with the reason, when not run as root or when a
tool the lab drives is missing.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from wgpunch.lab import state
from wgpunch.lab.lab import Lab
from wgpunch.lab.scenario import Scenario

LAB_TOOLS = ("ip", "nft", "wireguard-go", "wg", "conntrack", "ping")

# The fuzz tests' settings (tests/fuzzing.py, docs/fuzzing.md): CI-sized by default, so that
# all of them together take well under 20 s; WGPUNCH_FUZZ_EXAMPLES=100000 for a long run.
settings.register_profile(
    "wgpunch-fuzz",
    max_examples=int(os.environ.get("WGPUNCH_FUZZ_EXAMPLES") or 200),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def lab_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "lab tests need root (network namespaces, veth links, nftables)"
    missing = [tool for tool in LAB_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"lab tests need {', '.join(missing)} installed"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = lab_skip_reason()
    if reason:
        for item in items:
            if item.get_closest_marker("lab"):
                item.add_marker(pytest.mark.skip(reason=reason))


def unique_prefix() -> str:
    """`tl` + 4 hex digits, not used by anything on the machine right now."""
    while True:
        prefix = "tl" + secrets.token_hex(2)
        if not state.in_use(prefix):
            return prefix


@pytest.fixture
def lab_prefix() -> str:
    """A fresh prefix for a test that builds its lab itself (CLI, `with Lab(...)`)."""
    return unique_prefix()


class LabFactory:
    """`make_lab(scenario)` builds a lab; every lab it built is closed at the end."""

    def __init__(self) -> None:
        self.labs: list[Lab] = []

    def __call__(self, scenario: Scenario, *, prefix: str | None = None) -> Lab:
        lab = Lab(scenario, prefix=prefix or unique_prefix())
        self.labs.append(lab)
        return lab.build()

    def close(self) -> None:
        errors = []
        for lab in reversed(self.labs):
            try:
                lab.close()
            except Exception as error:  # close the others anyway, then report
                errors.append(error)
        if errors:
            raise errors[0]


@pytest.fixture
def make_lab() -> Iterator[LabFactory]:
    factory = LabFactory()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def make_module_lab() -> Iterator[LabFactory]:
    """Like `make_lab`, for a lab that a whole test module shares."""
    factory = LabFactory()
    try:
        yield factory
    finally:
        factory.close()
