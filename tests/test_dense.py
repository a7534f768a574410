"""Tests of the EGNN's dense and segment paths: agreement with the naive path, fallback, equivariance."""

import functools

import chex
import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest

from geonorm_jax import egnn, equivariance, graphs

N = 4
NUM_SYSTEMS = 3
BATCH_SIZE = 5  # two systems of padding in the dense view, plus the padding graph's extra node
SMALL = dict(num_layers=2, hidden_dim=8, num_particles=N)
# One system's [N, N, H] float32 pair array is 512 bytes, so this runs the
# pair work in chunks of one system and exercises jax.lax.map.
ONE_SYSTEM_CHUNKS = 512

CONFIGS = [
    dict(norm="none"),
    dict(norm="none", norm_diff=True, coords_tanh=True, h_layernorm=True, edge_input_distance=False),
    dict(norm="layernorm", norm_mode="particle"),
    dict(norm="layernorm", norm_mode="adaptive", norm_placement="every"),
    dict(norm="scalenorm", norm_mode="shared", scalenorm_kind="rms"),
    dict(norm="geonorm", norm_mode="particle", sigma="particle"),
    dict(norm="geonorm", norm_mode="shared", sigma="system"),
    dict(norm="geonorm", norm_mode="adaptive", sigma="particle", norm_placement="every", norm_diff=True),
]


def _config_id(config):
    return "-".join(str(value) for value in config.values())


def _batch(dtype=np.float32, num_systems=NUM_SYSTEMS, batch_size=BATCH_SIZE, seed=0, n_particles=N):
    rng = np.random.default_rng(seed)
    x = 2.0 * rng.normal(size=(num_systems, n_particles, 3))
    v = 0.5 * rng.normal(size=(num_systems, n_particles, 3))
    charges = rng.choice([-1.0, 1.0], size=(num_systems, n_particles))
    target = x + v + 0.1 * rng.normal(size=x.shape)
    return graphs.build_graphs(x, v, charges, target, batch_size=batch_size, dtype=dtype)


def _random_params(model, graph, key):
    """Draw random parameters in the model's pytree without compiling its init.

    Kernels get N(0, 1/fan_in) entries. Every other leaf gets N(0, 0.2**2)
    noise around 0, or around 1 for norm scales ``g``, so that every term of
    the model acts, including the norm weights that init sets to zero.
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), graph)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(key, len(leaves))
    values = []
    for (path, shape), leaf_key in zip(leaves, keys):
        noise = jax.random.normal(leaf_key, shape.shape, shape.dtype)
        name = str(getattr(path[-1], "key", ""))
        if name == "kernel" and len(shape.shape) == 2:
            values.append(noise / np.sqrt(shape.shape[0]))
        else:
            values.append((1.0 if name == "g" else 0.0) + 0.2 * noise)
    return treedef.unflatten(values)


def _models(config, dtype=jnp.float32, chunk_bytes=ONE_SYSTEM_CHUNKS):
    """Return the dense, segment and naive models of one configuration."""
    options = dict(param_dtype=dtype, **SMALL, **config)
    dense = egnn.EGNN(message_passing="dense", chunk_bytes=chunk_bytes, **options)
    segment = egnn.EGNN(message_passing="segment", **options)
    naive = egnn.EGNN(message_passing="naive", **options)
    return dense, segment, naive


def _output_loss_and_grad(model):
    """Jit ``(params, graph) -> ((loss, output), grad)``: one compile per model."""

    def loss(params, graph):
        out = model.apply(params, graph)
        return graphs.masked_mse(out, graph.nodes["target"], graph), out

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _outputs_and_grads(config, dtype_name, chunk_bytes=ONE_SYSTEM_CHUNKS):
    dtype = jnp.dtype(dtype_name)
    graph = _batch(np.dtype(dtype_name))
    dense, segment, naive = _models(config, dtype, chunk_bytes)
    params = _random_params(segment, graph, jax.random.key(1))
    results = {}
    for name, model in (("dense", dense), ("segment", segment), ("naive", naive)):
        (loss, out), grad = _output_loss_and_grad(model)(params, graph)
        results[name] = (np.asarray(out), float(loss), grad)
    return results


def _assert_paths_agree(results, rtol, atol):
    """Check the dense and segment paths' outputs, losses and gradients against the naive path's."""
    n_real = NUM_SYSTEMS * N
    naive_out, naive_loss, naive_grad = results["naive"]
    scale = np.abs(naive_out[:n_real]).max()
    for name in ("dense", "segment"):
        out, loss, grad = results[name]
        np.testing.assert_allclose(out[:n_real], naive_out[:n_real], rtol=rtol, atol=atol * scale, err_msg=name)
        np.testing.assert_allclose(loss, naive_loss, rtol=rtol, err_msg=name)
        chex.assert_trees_all_equal_structs(grad, naive_grad)
        for path, leaf in jax.tree_util.tree_leaves_with_path(grad):
            naive_leaf = np.asarray(functools.reduce(lambda tree, entry: tree[entry.key], path, naive_grad))
            leaf_scale = max(np.abs(naive_leaf).max(), 1e-30)
            np.testing.assert_allclose(
                leaf, naive_leaf, rtol=rtol, atol=atol * leaf_scale, err_msg=f"{name} {jax.tree_util.keystr(path)}"
            )


# --- Parameters and layout ------------------------------------------------------------


def test_edges_to_dense_matches_senders_and_receivers():
    batch_size, n_particles = 2, 5
    senders, receivers = graphs.fully_connected_edges(batch_size, n_particles)
    values = np.arange(senders.size, dtype=np.float32)[:, None] + 1.0  # [e, 1], no zeros
    dense = np.asarray(egnn.edges_to_dense(jnp.asarray(values), batch_size, n_particles))
    chex.assert_shape(dense, (batch_size, n_particles, n_particles, 1))
    graph_index = receivers // n_particles
    np.testing.assert_array_equal(
        dense[graph_index, receivers % n_particles, senders % n_particles, 0], values[:, 0]
    )
    diagonal = dense[:, np.arange(n_particles), np.arange(n_particles), 0]
    np.testing.assert_array_equal(diagonal, 0.0)


@pytest.mark.parametrize("batch_size, n_particles", [(100, 5), (50, 8), (50, 12), (50, 16), (50, 50), (50, 100)])
def test_cpu_chunks_split_large_batches(batch_size, n_particles):
    hidden = 64
    batch_bytes = batch_size * n_particles**2 * hidden * 4
    chunk_bytes = egnn.cpu_chunk_bytes(batch_size, n_particles, hidden)
    if batch_bytes <= egnn.CPU_WHOLE_BATCH_BYTES:
        assert chunk_bytes == 0
        return
    chunk = egnn._chunk_size(batch_size, n_particles, hidden, chunk_bytes)
    assert batch_size % chunk == 0
    assert chunk < batch_size
    assert chunk == 1 or chunk * n_particles**2 * hidden * 4 <= egnn.CPU_CHUNK_BYTES


@pytest.mark.parametrize("config", [CONFIGS[1], CONFIGS[7]], ids=_config_id)
def test_all_paths_init_the_same_params(config):
    graph = _batch()
    dense, segment, naive = (jax.jit(model.init)(jax.random.key(2), graph) for model in _models(config))
    chex.assert_trees_all_equal(dense, naive)
    chex.assert_trees_all_equal(segment, naive)


# --- Agreement of the paths ---------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_paths_match_naive_float32(config):
    _assert_paths_agree(_outputs_and_grads(config, "float32"), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("config", [CONFIGS[1], CONFIGS[5], CONFIGS[7]], ids=_config_id)
def test_paths_match_naive_float64(config):
    with jax.enable_x64(True):
        results = _outputs_and_grads(config, "float64")
    _assert_paths_agree(results, rtol=1e-10, atol=1e-12)


def test_dense_unchunked_matches_naive():
    results = _outputs_and_grads(CONFIGS[5], "float32", chunk_bytes=0)
    _assert_paths_agree(results, rtol=2e-4, atol=2e-5)


# --- The pair stage's hand-written gradient ----------------------------------------------


def _pair_stage_inputs(seed, x_scale, systems=2, hidden=8, edge_attrs=2):
    """Random float64 inputs of egnn.dense_edge_stage, with N(0, 1/fan_in) kernels."""
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return jnp.asarray(scale * rng.normal(size=shape))

    weights = egnn.PairWeights(
        pair_kernel=normal(1 + edge_attrs, hidden),
        phi_e_kernel_1=normal(hidden, hidden, scale=hidden**-0.5),
        phi_e_bias_1=normal(hidden, scale=0.2),
        phi_x_kernel_0=normal(hidden, hidden, scale=hidden**-0.5),
        phi_x_bias_0=normal(hidden, scale=0.2),
        phi_x_kernel_1=normal(hidden, 1, scale=hidden**-0.5),
    )
    receiver_part, sender_part = normal(systems, N, hidden), normal(systems, N, hidden)
    x = normal(systems, N, 3, scale=x_scale)
    return weights, receiver_part, sender_part, x, normal(systems, N, N, edge_attrs)


# With x_scale=300 every product (x_i - x_j) phi_x(m_ij) of these inputs is beyond the clip at 100.
@pytest.mark.parametrize(
    "norm_diff, coords_tanh, x_scale", [(False, False, 1.0), (True, True, 1.0), (False, False, 300.0)]
)
def test_pair_stage_grad_matches_autodiff(norm_diff, coords_tanh, x_scale):
    with jax.enable_x64(True):
        inputs = _pair_stage_inputs(0, x_scale)
        fused = functools.partial(egnn.dense_edge_stage, norm_diff=norm_diff, coords_tanh=coords_tanh)
        # The same forward pass without the custom VJP, differentiated by JAX.
        plain = functools.partial(egnn._edge_stage, norm_diff, coords_tanh)
        fused_outputs, fused_vjp = jax.vjp(fused, *inputs)
        plain_outputs, plain_vjp = jax.vjp(plain, *inputs)
        chex.assert_trees_all_close(fused_outputs, plain_outputs, rtol=1e-12, atol=0.0)
        rng = np.random.default_rng(1)
        cotangents = jax.tree_util.tree_map(lambda out: jnp.asarray(rng.normal(size=out.shape)), plain_outputs)
        fused_grads, plain_grads = fused_vjp(cotangents), plain_vjp(cotangents)
    chex.assert_trees_all_equal_structs(fused_grads, plain_grads)
    for (path, plain_leaf), fused_leaf in zip(
        jax.tree_util.tree_leaves_with_path(plain_grads), jax.tree_util.tree_leaves(fused_grads)
    ):
        scale = max(np.abs(plain_leaf).max(), 1e-30)
        np.testing.assert_allclose(
            fused_leaf, plain_leaf, rtol=1e-10, atol=1e-12 * scale, err_msg=jax.tree_util.keystr(path)
        )


def test_dense_grad_under_vmap_matches_loop():
    """The seed sweep vmaps the training step, so the custom VJP must batch over parameter sets."""
    dense, segment, _ = _models(CONFIGS[5])
    graph = _batch()
    param_sets = [_random_params(segment, graph, jax.random.key(seed)) for seed in (3, 4)]
    grad = _output_loss_and_grad(dense)
    stacked = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *param_sets)

    (losses, _), grads = jax.vmap(grad, in_axes=(0, None))(stacked, graph)

    for index, params in enumerate(param_sets):
        (loss, _), expected = grad(params, graph)
        np.testing.assert_allclose(losses[index], loss, rtol=1e-5)
        vmapped = jax.tree_util.tree_map(lambda leaf: leaf[index], grads)
        chex.assert_trees_all_close(vmapped, expected, rtol=1e-4, atol=1e-6)


def test_dense_padding_outputs_finite():
    dense, _, _ = _models(CONFIGS[5])
    graph = _batch()
    params = _random_params(dense, graph, jax.random.key(0))
    out = jax.jit(dense.apply)(params, graph)
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[BATCH_SIZE * N :], graph.nodes["x"][BATCH_SIZE * N :])


# --- Path selection ---------------------------------------------------------------------


def _batch_without_dense_layout():
    """The same systems padded to a budget that graphs.dense_shape does not recognize."""
    graph = _batch(batch_size=NUM_SYSTEMS)
    unpadded = jraph.unpad_with_graphs(graph)
    return jraph.pad_with_graphs(unpadded, n_node=NUM_SYSTEMS * N + 3, n_edge=graph.senders.size + 2, n_graph=5)


def test_auto_message_passing_by_shape():
    assert egnn.auto_message_passing((5, egnn.DENSE_MIN_PARTICLES)) == "dense"
    assert egnn.auto_message_passing((5, egnn.DENSE_MIN_PARTICLES - 1)) == "segment"
    assert egnn.auto_message_passing(None) == "segment"


def test_auto_uses_dense_on_build_graphs_batch():
    n_particles = egnn.DENSE_MIN_PARTICLES
    graph = _batch(n_particles=n_particles)
    assert graphs.dense_shape(graph) == (BATCH_SIZE, n_particles)
    model = egnn.EGNN(num_layers=2, hidden_dim=8)
    jaxpr = str(jax.make_jaxpr(model.init)(jax.random.key(0), graph))
    assert "scatter-add" not in jaxpr


def test_auto_uses_segment_below_dense_min_particles():
    graph = _batch()
    assert N < egnn.DENSE_MIN_PARTICLES
    jaxpr = str(jax.make_jaxpr(egnn.EGNN(**SMALL).init)(jax.random.key(0), graph))
    assert "scatter-add" in jaxpr


def test_auto_falls_back_to_segment():
    graph = _batch_without_dense_layout()
    assert graphs.dense_shape(graph) is None
    config = dict(norm="geonorm", norm_mode="shared")
    auto = egnn.EGNN(num_layers=2, hidden_dim=8, **config)
    segment = egnn.EGNN(num_layers=2, hidden_dim=8, message_passing="segment", **config)
    params = _random_params(segment, graph, jax.random.key(0))
    jaxpr = str(jax.make_jaxpr(auto.apply)(params, graph))
    assert "scatter-add" in jaxpr
    np.testing.assert_array_equal(jax.jit(auto.apply)(params, graph), jax.jit(segment.apply)(params, graph))


def test_forced_dense_rejects_other_layout():
    model = egnn.EGNN(num_layers=2, hidden_dim=8, message_passing="dense")
    with pytest.raises(ValueError, match="message_passing='dense' needs a batch"):
        jax.eval_shape(model.init, jax.random.key(0), _batch_without_dense_layout())


@pytest.mark.parametrize("attribute, value", [("message_passing", "gather"), ("chunk_bytes", -1)])
def test_invalid_dense_option_raises(attribute, value):
    model = egnn.EGNN(**{attribute: value}, **SMALL)
    with pytest.raises(ValueError, match=f"invalid EGNN {attribute}"):
        jax.eval_shape(model.init, jax.random.key(0), _batch())


# --- Equivariance -----------------------------------------------------------------------


@pytest.mark.parametrize("message_passing", ["dense", "segment", "naive"])
@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[7]], ids=_config_id)
def test_equivariant_float32_every_path(config, message_passing):
    model = egnn.EGNN(message_passing=message_passing, chunk_bytes=ONE_SYSTEM_CHUNKS, **SMALL, **config)
    graph = _batch()
    params = _random_params(model, graph, jax.random.key(0))
    errors = equivariance.equivariance_error(model.apply, params, graph, jax.random.key(5), num_draws=3)
    for kind in ("rotation", "translation", "reflection", "rigid"):
        relative = errors[f"{kind}_max"] / errors["output_scale"]
        assert relative < 1e-5, f"{kind} error {relative:.2e}"
