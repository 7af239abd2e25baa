"""End-to-end fixtures: namespace clusters running the real ``overlayd`` command.

Each test gets its own cluster (``overlayd._topology``) with a fresh ``ovd<hex>-`` prefix; the
finalizer removes every namespace and process even when the test fails, and prints the tail of
every daemon log into the failure report.  Figures a test measures are collected with the
``figures`` fixture and printed in the terminal summary (run with ``-s`` to see them inline too).
"""

from __future__ import annotations

import os
import shutil
import statistics
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from overlayd import _topology as topo

_FIGURES: list[str] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.root)


@pytest.fixture(autouse=True)
def _needs_root_and_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("end-to-end tests need root (network namespaces)")
    for tool in ("ip", "ping"):
        if shutil.which(tool) is None:
            pytest.skip(f"end-to-end tests need {tool}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _FIGURES:
        terminalreporter.section("overlayd end-to-end figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)


class Figures:
    """Measured numbers, printed at once and again in the terminal summary."""

    def __init__(self, test: str) -> None:
        self.test = test

    def add(self, text: str) -> None:
        line = f"{self.test}: {text}"
        print(line)
        _FIGURES.append(line)

    def latency(self, what: str, samples: list[float]) -> None:
        if samples:
            ms = sorted(s * 1000 for s in samples)
            self.add(
                f"{what}: median {statistics.median(ms):.0f} ms, min {ms[0]:.0f} ms, max {ms[-1]:.0f} ms (n={len(ms)})"
            )


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Figures:
    return Figures(request.node.name)


ClusterFactory = Callable[..., topo.Cluster]


@pytest.fixture
def make_cluster(request: pytest.FixtureRequest) -> Iterator[ClusterFactory]:
    """``make_cluster(3, store_ns=False)`` -> a built cluster, always cleaned up."""
    made: list[topo.Cluster] = []

    def make(hosts: int = 3, **kwargs: Any) -> topo.Cluster:
        cluster = topo.Cluster(hosts, **kwargs)
        made.append(cluster)
        return cluster.build()

    yield make
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for cluster in made:
        if failed:
            for host in cluster.hosts:
                if host.daemon is not None:
                    print(f"--- {cluster.prefix} {host.name} overlayd log (tail) ---\n{host.daemon.log_tail(40)}")
        cluster.cleanup()
    leftover = [ns for ns in topo.list_netns() if any(ns.startswith(c.prefix) for c in made)]
    assert not leftover, f"namespaces left behind: {leftover}"
