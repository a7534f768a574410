"""Padded fully connected batches: layout, masks and masked losses."""

import jax
import numpy as np
import pytest

from geonorm_jax import graphs


def random_systems(num_systems, num_particles, seed=0):
    rng = np.random.default_rng(seed)
    x, v, target = (rng.normal(size=(num_systems, num_particles, 3)) for _ in range(3))
    charges = rng.choice([-1.0, 1.0], size=(num_systems, num_particles))
    return x, v, charges, target


def test_build_graphs_edge_layout():
    x, v, charges, target = random_systems(3, 4)

    graph = graphs.build_graphs(x, v, charges, target, batch_size=5)

    n_real_edges = 3 * 4 * 3
    senders = graph.senders[:n_real_edges]
    receivers = graph.receivers[:n_real_edges]
    assert np.all(senders != receivers)
    assert np.all(senders // 4 == receivers // 4), "edges must stay inside one system"
    np.testing.assert_array_equal(receivers.reshape(3, 4, 3)[..., 0], np.arange(12).reshape(3, 4))
    pairs = set(zip(senders.tolist(), receivers.tolist()))
    assert len(pairs) == n_real_edges
    np.testing.assert_array_equal(graph.n_node, [4, 4, 4, 9, 0, 0])


def test_build_graphs_features():
    x, v, charges, target = random_systems(2, 3)

    graph = graphs.build_graphs(x, v, charges, target)

    assert graph.nodes["x"].dtype == np.float32
    np.testing.assert_allclose(graph.nodes["h"][:6, 0], np.linalg.norm(v, axis=-1).reshape(-1), rtol=1e-6)
    q = charges.reshape(-1)
    expected_product = q[graph.receivers[:12]] * q[graph.senders[:12]]
    np.testing.assert_array_equal(graph.edges["charge_product"][:12, 0], expected_product)
    assert graph.n_node.shape == (3,), "a full batch still carries one padding graph"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, v, q, t: (x[:, :1], v[:, :1], q[:, :1], t[:, :1]), "at least 2 particles"),
        (lambda x, v, q, t: (x, v[:, :2], q, t), "velocities must have the shape"),
        (lambda x, v, q, t: (x, v, q[:, :2], t), "charges must have shape"),
        (lambda x, v, q, t: (np.where(x > 1, np.nan, x), v, q, t), "positions contain NaN"),
        (lambda x, v, q, t: (x[..., :2], v, q, t), "positions must have shape"),
    ],
)
def test_build_graphs_rejects_invalid(change, message):
    arrays = change(*random_systems(2, 3))

    with pytest.raises(ValueError, match=message):
        graphs.build_graphs(*arrays)


def test_build_graphs_rejects_overfull_batch():
    with pytest.raises(ValueError, match="batch_size=1"):
        graphs.build_graphs(*random_systems(2, 3), batch_size=1)


def test_dense_shape_of_padded_batch():
    graph = graphs.build_graphs(*random_systems(2, 5), batch_size=4)

    assert graphs.dense_shape(graph) == (4, 5)
    trimmed = graph._replace(senders=graph.senders[:-1], receivers=graph.receivers[:-1])
    assert graphs.dense_shape(trimmed) is None


def test_masks_under_jit_with_captured_batch():
    graph = graphs.build_graphs(*random_systems(2, 3), batch_size=3)

    nodes = jax.jit(lambda: graphs.node_mask(graph))()
    systems = jax.jit(lambda: graphs.graph_mask(graph))()

    np.testing.assert_array_equal(nodes, [True] * 6 + [False] * 4)
    np.testing.assert_array_equal(systems, [True, True, False, False])


def test_masked_mse_ignores_padding():
    x, v, charges, target = random_systems(3, 4)
    tight = graphs.build_graphs(x, v, charges, target)
    padded = graphs.build_graphs(x, v, charges, target, batch_size=7)
    # Padding nodes hold zeros; give them a large error that must not count.
    prediction = np.asarray(padded.nodes["x"]).copy()
    prediction[12:] = 1e3

    tight_mse = graphs.masked_mse(tight.nodes["x"], tight.nodes["target"], tight)
    padded_mse = graphs.masked_mse(prediction, padded.nodes["target"], padded)

    np.testing.assert_allclose(tight_mse, np.mean((x - target) ** 2), rtol=1e-5)
    np.testing.assert_allclose(padded_mse, tight_mse, rtol=1e-6)


def test_per_graph_mse_zero_on_padding():
    x, v, charges, target = random_systems(2, 4)
    graph = graphs.build_graphs(x, v, charges, target, batch_size=4)

    per_graph = np.asarray(graphs.per_graph_mse(graph.nodes["x"], graph.nodes["target"], graph))

    np.testing.assert_allclose(per_graph[:2], np.mean((x - target) ** 2, axis=(1, 2)), rtol=1e-5)
    np.testing.assert_array_equal(per_graph[2:], 0.0)
    assert np.all(np.isfinite(per_graph))
