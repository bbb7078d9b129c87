"""Session-wide fixtures: one real local Ray (2 CPUs) shared by every module that runs searches in
the test process (tests/experiments/ and tests/population/), so the suite starts Ray once instead
of once per module, and the token cache its workers inherit. Ray is imported only when a test asks
for it: tests/evo/ runs without torch or Ray.

One real `ray start --head` (loopback, token auth on), ``ray_head``, for every module whose `evo`
runs join a cluster through RAY_ADDRESS or go through `ray job submit` (the benchmark smoke tests,
tests/experiments/test_jobs.py, tests/population/test_storage_faults.py): those modules run first,
one after another, and the head is stopped after the last of them, so the suite starts it once
and it idles through nothing."""
from __future__ import annotations

import os

import pytest

_HEAD: dict = {}   # "last": the last test item that uses ray_head; "head": the started RayHead


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

    from population.cluster import init_local_ray

    if ray.is_initialized():
        ray.shutdown()
    # none of Ray's fixed ports: the `evo run`s and `ray start`s of the tests, and other Rays on
    # the machine, start beside it
    init_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """The session's `ray start --head` (tests/helpers.RayHead): ``address`` for `ray job`,
    ``driver_env`` (RAY_ADDRESS, the token) for an `evo run` that joins it. Its processes (and
    the job drivers it spawns) run without Python warnings or usage stats, as a quiet cluster."""
    from tests.helpers import RayHead, evo_env

    root = tmp_path_factory.mktemp("rayhead")
    env = evo_env(root / "cache")
    env.pop("EVO_DEBUG", None)
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONWARNINGS="ignore")
    head = _HEAD["head"] = RayHead(root, env)
    yield head
    head.stop()


def _uses_head(item) -> bool:
    return "ray_head" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(session, config, items):
    """The modules that use ``ray_head`` first (in their usual order), then the others (in theirs)."""
    modules_with_head = {item.module.__name__ for item in items if _uses_head(item) and hasattr(item, "module")}
    first = [i for i in items if getattr(getattr(i, "module", None), "__name__", None) in modules_with_head]
    rest = [i for i in items if getattr(getattr(i, "module", None), "__name__", None) not in modules_with_head]
    items[:] = first + rest
    users = [i for i in items if _uses_head(i)]
    _HEAD["last"] = users[-1] if users else None


def pytest_runtest_teardown(item, nextitem):
    """After the last test that uses ``ray_head``: stop the head now, not at the session's end."""
    if item is _HEAD.get("last") and "head" in _HEAD:
        _HEAD.pop("head").stop()
