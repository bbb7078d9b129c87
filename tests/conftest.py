"""Session-wide fixtures: one real local Ray (2 CPUs) shared by every module that runs searches in
the test process (tests/experiments/ and tests/population/), so the suite starts Ray once instead
of once per module, and the token cache its workers inherit. Ray is imported only when a test asks
for it: tests/evo/ runs without torch or Ray."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A token cache of the session's own (EVO_CACHE_DIR is set before ray.init: workers inherit it)."""
    path = str(tmp_path_factory.mktemp("token-cache"))
    previous = os.environ.get("EVO_CACHE_DIR")
    os.environ["EVO_CACHE_DIR"] = path
    yield path
    if previous is None:
        os.environ.pop("EVO_CACHE_DIR", None)
    else:
        os.environ["EVO_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def ray_local(cache_dir):
    """A local Ray of 2 CPUs for the session; a test that needs a Ray of its own starts it in a
    subprocess (`evo run`, `ray start`), never in this process."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
