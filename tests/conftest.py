"""Test setup: raise on any NaN or Inf that a JAX computation produces."""

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
