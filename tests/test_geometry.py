"""Tests of geonorm_jax.geometry: random transforms, safe norms, centroids."""

import chex
import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest

from geonorm_jax import geometry, graphs

NUM_DRAWS = 512


def _keys(seed: int, count: int = NUM_DRAWS):
    return jax.random.split(jax.random.key(seed), count)


def _batch(num_systems=3, n_particles=4, batch_size=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_systems, n_particles, 3))
    v = rng.normal(size=(num_systems, n_particles, 3))
    charges = rng.choice([-1.0, 1.0], size=(num_systems, n_particles))
    return graphs.build_graphs(x, v, charges, x + 1.0, batch_size=batch_size), x


def test_random_rotation_is_proper_orthogonal():
    rotations = jax.vmap(geometry.random_rotation)(_keys(0))
    chex.assert_shape(rotations, (NUM_DRAWS, 3, 3))
    gram = rotations @ jnp.swapaxes(rotations, -1, -2)
    np.testing.assert_allclose(gram, np.broadcast_to(np.eye(3), gram.shape), atol=1e-5)
    np.testing.assert_allclose(jnp.linalg.det(rotations), 1.0, atol=1e-5)


def test_random_rotation_mean_is_zero():
    # The Haar measure on SO(3) has E[R] = 0; a biased sampler would not.
    rotations = jax.vmap(geometry.random_rotation)(_keys(1, 8192))
    np.testing.assert_allclose(rotations.mean(axis=0), np.zeros((3, 3)), atol=0.05)


def test_random_rotation_float64():
    with jax.enable_x64(True):
        rotation = geometry.random_rotation(jax.random.key(2), dtype=jnp.float64)
        assert rotation.dtype == jnp.float64
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-14)


def test_random_reflection_is_improper_orthogonal():
    reflections = jax.vmap(geometry.random_reflection)(_keys(3))
    gram = reflections @ jnp.swapaxes(reflections, -1, -2)
    np.testing.assert_allclose(gram, np.broadcast_to(np.eye(3), gram.shape), atol=1e-5)
    np.testing.assert_allclose(jnp.linalg.det(reflections), -1.0, atol=1e-5)


def test_random_translation_has_scale_length():
    translations = jax.vmap(lambda key: geometry.random_translation(key, scale=5.0))(_keys(4))
    np.testing.assert_allclose(jnp.linalg.norm(translations, axis=-1), 5.0, rtol=1e-5)


def test_transform_velocities_never_translate():
    rotation = geometry.random_rotation(jax.random.key(5))
    x = jnp.arange(12.0).reshape(4, 3)
    translation = jnp.array([1.0, -2.0, 3.0])
    np.testing.assert_allclose(geometry.transform_positions(x, rotation, translation), x @ rotation.T + translation)
    np.testing.assert_allclose(geometry.transform_velocities(x, rotation), x @ rotation.T)


def test_transform_graph_moves_each_system_by_its_own_transform():
    graph, x = _batch()
    num_graphs = graph.n_node.shape[0]
    rotations = jax.vmap(geometry.random_rotation)(_keys(6, num_graphs))
    translations = jax.vmap(geometry.random_translation)(_keys(7, num_graphs))
    moved = geometry.transform_graph(graph, rotations, translations)
    n_real = x.shape[0] * x.shape[1]
    expected_x = np.einsum("sij,snj->sni", rotations[:3], x) + translations[:3, None, :]
    np.testing.assert_allclose(moved.nodes["x"][:n_real], expected_x.reshape(-1, 3), atol=1e-5)
    expected_v = np.einsum("sij,snj->sni", rotations[:3], graph.nodes["v"][:n_real].reshape(x.shape))
    np.testing.assert_allclose(moved.nodes["v"][:n_real], expected_v.reshape(-1, 3), atol=1e-5)
    expected_target = np.einsum("sij,snj->sni", rotations[:3], x + 1.0) + translations[:3, None, :]
    np.testing.assert_allclose(moved.nodes["target"][:n_real], expected_target.reshape(-1, 3), atol=1e-5)
    np.testing.assert_array_equal(moved.nodes["h"], graph.nodes["h"])


@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_safe_norm_at_zero_is_finite(eps):
    zero = jnp.zeros(3)
    value = geometry.safe_norm(zero, eps=eps)
    gradient = jax.grad(lambda x: geometry.safe_norm(x, eps=eps))(zero)
    np.testing.assert_allclose(value, np.sqrt(eps), rtol=1e-6)
    np.testing.assert_array_equal(gradient, np.zeros(3))


def test_safe_norm_matches_norm_away_from_zero():
    x = jax.random.normal(jax.random.key(8), (10, 3))
    np.testing.assert_allclose(geometry.safe_norm(x), jnp.linalg.norm(x, axis=-1), rtol=1e-6)
    np.testing.assert_allclose(
        jax.grad(lambda y: geometry.safe_norm(y).sum())(x), x / jnp.linalg.norm(x, axis=-1, keepdims=True), rtol=1e-5
    )


@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_safe_normalize_at_zero_is_zero(eps):
    zero = jnp.zeros(3)
    np.testing.assert_array_equal(geometry.safe_normalize(zero, eps=eps), np.zeros(3))
    jacobian = jax.jacfwd(lambda x: geometry.safe_normalize(x, eps=eps))(zero)
    assert np.all(np.isfinite(jacobian))
    reverse = jax.grad(lambda x: geometry.safe_normalize(x, eps=eps).sum())(zero)
    assert np.all(np.isfinite(reverse))


def test_safe_normalize_is_unit_length():
    x = jax.random.normal(jax.random.key(9), (10, 3))
    np.testing.assert_allclose(jnp.linalg.norm(geometry.safe_normalize(x), axis=-1), 1.0, rtol=1e-6)


def test_system_index_of_padded_batch():
    graph, _ = _batch(num_systems=2, n_particles=3, batch_size=3)
    index = geometry.system_index(graph)
    np.testing.assert_array_equal(index.node_graph, [0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    np.testing.assert_array_equal(index.particle_index, [0, 1, 2, 0, 1, 2, 0, 1, 2, 3])
    # 2 real graphs, 1 padding graph holding the 4 padding nodes, 1 empty padding graph.
    assert index.num_graphs == 4
    np.testing.assert_array_equal(index.n_node, [3, 3, 4, 0])


def test_segment_centroid_matches_dense_mean():
    graph, x = _batch()
    centroids = jax.jit(geometry.graph_centroid)(graph.nodes["x"], graph)
    chex.assert_shape(centroids, (graph.n_node.shape[0], 3))
    np.testing.assert_allclose(centroids[:3], x.mean(axis=1), atol=1e-6)


def test_segment_centroid_empty_graph_is_zero():
    graph, _ = _batch(num_systems=2, n_particles=3, batch_size=2)
    # Two padding graphs: the second one has no nodes.
    graph = jraph.pad_with_graphs(jraph.unpad_with_graphs(graph), n_node=8, n_edge=13, n_graph=4)
    assert int(graph.n_node[-1]) == 0
    centroids = geometry.graph_centroid(graph.nodes["x"], graph)
    np.testing.assert_array_equal(centroids[-1], np.zeros(3))
    assert np.all(np.isfinite(centroids))
    gradient = jax.grad(lambda x: geometry.graph_centroid(x, graph).sum())(graph.nodes["x"])
    assert np.all(np.isfinite(gradient))
