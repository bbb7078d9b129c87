"""One real `ray start --head` (loopback, token auth on) for the benchmark smoke tests whose `evo`
runs join a cluster through RAY_ADDRESS, as runs on a cluster do: they test the benchmarks' code
paths, not Ray's start, which bench/startup.py's test keeps measuring on a local Ray of its own."""
from __future__ import annotations

import pytest

from tests.helpers import RayHead, evo_env


@pytest.fixture(scope="package")
def ray_head(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-rayhead")
    head = RayHead(root, evo_env(root / "cache"))
    yield head
    head.stop()
