"""Fixtures for the official-SDK suite: a fresh mock upstream and proxy per test."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Mock, Proxy  # noqa: E402

# Fast upstream forwarding so a test sees the batches reach the mock within a second or two.
FAST_FORWARDING = ("--events-flush-interval", "300ms", "--telemetry-flush-interval", "300ms")


@pytest.fixture
def mock() -> Iterator[Mock]:
    m = Mock()
    yield m
    m.stop()


@pytest.fixture
def proxy(mock: Mock, request: pytest.FixtureRequest) -> Iterator[Proxy]:
    marker = request.node.get_closest_marker("proxy_args")
    extra = tuple(marker.args) if marker else ()
    p = Proxy(mock, *FAST_FORWARDING, *extra)
    yield p
    p.stop()
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        print(f"\n--- proxy log ({p.process.log_path}) ---\n{p.process.log_text()[-4000:]}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "proxy_args(*args): extra rollgate-proxy command-line arguments")
