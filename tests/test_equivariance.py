"""Tests of geonorm_jax.equivariance on hand-made maps with known errors, and on the EGNN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geonorm_jax import egnn, equivariance, graphs

N = 4
OFFSET = jnp.array([1.0, 0.0, 0.0])


def identity_positions(params, graph):
    return graph.nodes["x"]


def shifted_positions(params, graph):
    return graph.nodes["x"] + OFFSET  # translation- but not rotation-equivariant


def doubled_positions(params, graph):
    return 2.0 * graph.nodes["x"]  # rotation- but not translation-equivariant


def target_oracle(params, graph):
    return graph.nodes["target"]


def _batch(seed=0, num_systems=3, batch_size=4):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_systems, N, 3))
    v = rng.normal(size=(num_systems, N, 3))
    charges = rng.choice([-1.0, 1.0], size=(num_systems, N))
    return graphs.build_graphs(x, v, charges, x + 0.3 * v, batch_size=batch_size)


def test_equivariance_error_identity_is_zero():
    errors = equivariance.equivariance_error(identity_positions, None, _batch(), jax.random.key(0), num_draws=4)
    for kind in ("rotation", "translation", "reflection", "rigid"):
        assert errors[f"{kind}_max"] < 1e-5
        assert errors[f"{kind}_mean"] <= errors[f"{kind}_max"]


def test_equivariance_error_detects_fixed_offset():
    errors = equivariance.equivariance_error(shifted_positions, None, _batch(), jax.random.key(1), num_draws=4)
    assert errors["translation_max"] < 1e-5
    assert errors["rotation_max"] > 0.1
    assert errors["reflection_max"] > 0.1


def test_equivariance_error_detects_scaling():
    scale = 3.0
    errors = equivariance.equivariance_error(
        doubled_positions, None, _batch(), jax.random.key(2), num_draws=4, translation_scale=scale
    )
    assert errors["rotation_max"] < 1e-5
    # 2 (x + t) - (2 x + t) = t, whose length is the translation scale.
    np.testing.assert_allclose(errors["translation_max"], scale, rtol=1e-5)
    np.testing.assert_allclose(errors["translation_mean"], scale, rtol=1e-5)


def test_rte_oracle_has_zero_error():
    metrics = equivariance.rte_metrics(target_oracle, None, [_batch(0), _batch(1)], jax.random.key(3))
    assert metrics["num_samples"] == 6
    for name in ("untransformed", "rotation", "translation"):
        assert metrics[name]["max"] < 1e-10
    assert abs(metrics["rotation"]["delta"]) < 1e-10


def test_rte_untransformed_matches_masked_mse():
    batch = _batch()
    metrics = equivariance.rte_metrics(identity_positions, None, [batch], jax.random.key(4))
    per_graph = graphs.per_graph_mse(batch.nodes["x"], batch.nodes["target"], batch)[:3]
    np.testing.assert_allclose(metrics["untransformed"]["mean"], per_graph.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["untransformed"]["median"], np.median(per_graph), rtol=1e-6)
    np.testing.assert_allclose(metrics["untransformed"]["max"], per_graph.max(), rtol=1e-6)
    assert abs(metrics["rotation"]["delta"]) < 1e-5
    assert abs(metrics["translation"]["delta"]) < 1e-5


def test_rte_detects_translation_error():
    metrics = equivariance.rte_metrics(doubled_positions, None, [_batch()], jax.random.key(5))
    assert abs(metrics["rotation"]["delta"]) < 1e-5
    # Each prediction is off by exactly t, so the MSE grows by about |t|**2 / 3.
    assert metrics["translation"]["delta"] > 1.0
    assert metrics["equivariance_max"] > 1.0


def test_rte_egnn_deltas_near_zero():
    model = egnn.EGNN(num_layers=2, hidden_dim=8, norm="geonorm", num_particles=N)
    batch = _batch()
    params = jax.jit(model.init)(jax.random.key(6), batch)
    metrics = equivariance.rte_metrics(model.apply, params, [batch, _batch(7)], jax.random.key(7))
    mean = metrics["untransformed"]["mean"]
    assert abs(metrics["rotation"]["delta"]) < 1e-5 * mean
    assert abs(metrics["translation"]["delta"]) < 1e-4 * mean
    assert metrics["equivariance_max"] < 1e-4


def test_rte_empty_iterable_raises():
    with pytest.raises(ValueError, match="no real systems"):
        equivariance.rte_metrics(identity_positions, None, [], jax.random.key(8))
