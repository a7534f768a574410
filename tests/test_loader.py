"""Tests of the padded GraphsTuple loader."""

import jax
import numpy as np
import pytest

from geonorm_jax import graphs
from geonorm_jax.dataset import Split
from geonorm_jax.loader import GraphLoader

FRAMES = (30, 40)


def make_split(n_systems=7, n_particles=4, seed=0):
    """Random split whose systems are identifiable by x[s, 0, 0, 0] == s."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_systems, len(FRAMES), n_particles, 3))
    x[:, 0, 0, 0] = np.arange(n_systems)
    v = rng.normal(size=x.shape)
    charges = rng.choice([-1.0, 1.0], size=(n_systems, n_particles))
    return Split(x=x, v=v, charges=charges)


def system_ids(batch, n_particles):
    """Return the ids of the real systems in a batch, in batch order."""
    n_real = int(np.sum(np.asarray(graphs.graph_mask(batch))))
    return [int(round(batch.nodes["x"][s * n_particles, 0])) for s in range(n_real)]


def test_loader_batch_count():
    loader = GraphLoader(make_split(7), FRAMES, batch_size=3)
    assert len(loader) == 3
    assert len(list(loader)) == 3
    assert len(GraphLoader(make_split(6), FRAMES, batch_size=3)) == 2


def test_loader_pads_every_batch_to_budget():
    loader = GraphLoader(make_split(7, 4), FRAMES, batch_size=3)
    n_node, n_edge, n_graph = graphs.padding_budget(3, 4)
    assert loader.budget == (n_node, n_edge, n_graph)
    batches = list(loader.epoch(jax.random.PRNGKey(0)))
    for batch in batches:
        assert batch.nodes["x"].shape == (n_node, 3)
        assert batch.nodes["target"].shape == (n_node, 3)
        assert batch.senders.shape == (n_edge,)
        assert batch.n_node.shape == (n_graph,)

    # The last batch contains one real system and padding.
    assert int(np.sum(np.asarray(graphs.graph_mask(batches[-1])))) == 1


def test_loader_features_follow_frames():
    split = make_split(5, 3)
    loader = GraphLoader(split, FRAMES, batch_size=5, input_frame=40, target_frame=30)
    batch = next(iter(loader))
    np.testing.assert_allclose(batch.nodes["x"][:15], split.x[:, 1].reshape(-1, 3), rtol=1e-6)
    np.testing.assert_allclose(batch.nodes["v"][:15], split.v[:, 1].reshape(-1, 3), rtol=1e-6)
    np.testing.assert_allclose(batch.nodes["target"][:15], split.x[:, 0].reshape(-1, 3), rtol=1e-6)
    np.testing.assert_allclose(batch.nodes["h"][:15, 0], np.linalg.norm(split.v[:, 1], axis=-1).reshape(-1), rtol=1e-6)
    np.testing.assert_array_equal(batch.nodes["charge"][:15, 0], split.charges.reshape(-1))
    assert batch.nodes["x"].dtype == np.float32


def test_loader_edges_within_systems():
    n_particles = 4
    batch = next(iter(GraphLoader(make_split(3, n_particles), FRAMES, batch_size=3)))
    n_real_edges = 3 * n_particles * (n_particles - 1)
    senders = np.asarray(batch.senders[:n_real_edges])
    receivers = np.asarray(batch.receivers[:n_real_edges])
    assert np.all(senders != receivers)
    np.testing.assert_array_equal(senders // n_particles, receivers // n_particles)
    for system in range(3):
        in_system = receivers // n_particles == system
        assert np.sum(in_system) == n_particles * (n_particles - 1)
        pairs = set(zip(senders[in_system], receivers[in_system]))
        assert len(pairs) == n_particles * (n_particles - 1)


def test_loader_epoch_covers_each_system_once():
    loader = GraphLoader(make_split(11, 3), FRAMES, batch_size=4)
    ids = [i for batch in loader.epoch(jax.random.PRNGKey(1)) for i in system_ids(batch, 3)]
    assert sorted(ids) == list(range(11))


def test_loader_shuffle_deterministic_by_key():
    loader = GraphLoader(make_split(11, 3), FRAMES, batch_size=4)

    def epoch_ids(key):
        return [i for batch in loader.epoch(key) for i in system_ids(batch, 3)]

    assert epoch_ids(jax.random.PRNGKey(1)) == epoch_ids(jax.random.PRNGKey(1))
    assert epoch_ids(jax.random.PRNGKey(1)) != epoch_ids(jax.random.PRNGKey(2))
    assert epoch_ids(None) == list(range(11))


def test_loader_rejects_invalid():
    split = make_split(4, 3)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        GraphLoader(split, FRAMES, batch_size=0)
    with pytest.raises(ValueError, match="input_frame=20 is not among the kept frames"):
        GraphLoader(split, FRAMES, batch_size=2, input_frame=20)
    with pytest.raises(ValueError, match="target_frame=41"):
        GraphLoader(split, FRAMES, batch_size=2, target_frame=41)
    with pytest.raises(ValueError, match="at least 2 particles"):
        GraphLoader(make_split(4, 1), FRAMES, batch_size=2)
    with pytest.raises(ValueError, match="frames"):
        GraphLoader(split, (30,), batch_size=2)


def test_loader_rejects_nan():
    split = make_split(4, 3)
    split.v[2, 0, 1, 2] = np.nan
    with pytest.raises(ValueError, match="velocities contain 1 NaN"):
        GraphLoader(split, FRAMES, batch_size=2)


def test_loader_jit_compiles_once():
    loader = GraphLoader(make_split(7, 3), FRAMES, batch_size=3)
    traces = []

    @jax.jit
    def loss(batch):
        traces.append(None)
        return graphs.masked_mse(batch.nodes["x"], batch.nodes["target"], batch)

    for batch in loader.epoch(jax.random.PRNGKey(0)):
        assert np.isfinite(loss(batch))
    assert len(traces) == 1
