"""A persistent compilation cache for the train tests.

Most train tests run ``fit`` on the same tiny model; XLA's CPU compile dominates their time.
With a session-wide cache every program after the first is loaded instead of compiled.
"""

import jax
import pytest

_OPTIONS = {
    "jax_compilation_cache_dir": None,
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
}


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
    old = {name: getattr(jax.config, name) for name in _OPTIONS}
    values = dict(_OPTIONS, jax_compilation_cache_dir=str(tmp_path_factory.mktemp("jax_cache")))
    for name, value in values.items():
        jax.config.update(name, value)
    yield
    for name, value in old.items():
        jax.config.update(name, value)
