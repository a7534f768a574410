"""Test setup: raise on any NaN or Inf that a JAX computation produces; shared fixtures."""

import jax
import pytest


@pytest.fixture(autouse=True)
def debug_nans_and_infs():
    """Turn on ``jax_debug_nans`` and ``jax_debug_infs`` for one test, then restore them."""
    previous = (jax.config.jax_debug_nans, jax.config.jax_debug_infs)
    jax.config.update("jax_debug_nans", True)
    jax.config.update("jax_debug_infs", True)
    yield
    jax.config.update("jax_debug_nans", previous[0])
    jax.config.update("jax_debug_infs", previous[1])


@pytest.fixture
def allow_nans():
    """Let NaN and Inf through, for tests of divergence (``debug_nans_and_infs`` raises on them)."""
    jax.config.update("jax_debug_nans", False)
    jax.config.update("jax_debug_infs", False)
    yield


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Dataset root shared by one test module, so each tiny dataset is simulated once."""
    return tmp_path_factory.mktemp("data")
