"""Tests of the fused CPU pair kernel: agreement with the XLA paths, equivariance, path choice, build failures."""

import functools
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geonorm_jax import cpu_kernel, egnn, equivariance, graphs

N = 11  # at least egnn.DENSE_MIN_PARTICLES, so that "auto" falls back to the dense path
NUM_SYSTEMS = 3
BATCH_SIZE = 4  # one system of padding, plus the padding graph's extra node
SMALL = dict(num_layers=2, hidden_dim=16, num_particles=N)

CONFIGS = [
    dict(norm="none"),
    dict(norm="none", h_layernorm=True, edge_input_distance=False),
    dict(norm="layernorm", norm_mode="adaptive", norm_placement="every"),
    dict(norm="geonorm", norm_mode="particle", sigma="particle"),
    dict(norm="geonorm", norm_mode="shared", sigma="system"),
]


def _config_id(config):
    return "-".join(str(value) for value in config.values())


@pytest.fixture(scope="module", autouse=True)
def kernel_available():
    reason = cpu_kernel.unavailable_reason()
    if reason is not None:
        pytest.skip(f"fused CPU kernel unavailable: {reason}")


def _batch(seed=0, n_particles=N, batch_size=BATCH_SIZE):
    rng = np.random.default_rng(seed)
    x = 2.0 * rng.normal(size=(NUM_SYSTEMS, n_particles, 3))
    v = 0.5 * rng.normal(size=(NUM_SYSTEMS, n_particles, 3))
    charges = rng.choice([-1.0, 1.0], size=(NUM_SYSTEMS, n_particles))
    target = x + v + 0.1 * rng.normal(size=x.shape)
    return graphs.build_graphs(x, v, charges, target, batch_size=batch_size)


def _loss_and_grad(model):
    def loss(params, graph):
        out = model.apply(params, graph)
        return graphs.masked_mse(out, graph.nodes["target"], graph), out

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _assert_trees_close(actual, expected, rtol, atol, label):
    """Each leaf within ``rtol`` and ``atol`` times that leaf's largest entry."""
    chex.assert_trees_all_equal_structs(actual, expected)
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree_util.tree_leaves(actual)):
        scale = max(float(np.abs(want).max(initial=0.0)), 1e-30)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * scale, err_msg=f"{label} {jax.tree_util.keystr(path)}")


# --- The kernel against the XLA pair stage ------------------------------------------------


def _pair_stage_inputs(seed, systems, n_particles, hidden, edge_attrs, x_scale):
    """Random float32 inputs of the pair stage, with N(0, 1/fan_in) kernels."""
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return jnp.asarray(scale * rng.normal(size=shape), jnp.float32)

    weights = egnn.PairWeights(
        pair_kernel=normal(1 + edge_attrs, hidden, scale=0.5),
        phi_e_kernel_1=normal(hidden, hidden, scale=hidden**-0.5),
        phi_e_bias_1=normal(hidden, scale=0.2),
        phi_x_kernel_0=normal(hidden, hidden, scale=hidden**-0.5),
        phi_x_bias_0=normal(hidden, scale=0.2),
        phi_x_kernel_1=normal(hidden, 1, scale=hidden**-0.5),
    )
    parts = normal(systems, n_particles, hidden), normal(systems, n_particles, hidden)
    x = normal(systems, n_particles, 3, scale=x_scale)
    return weights, *parts, x, normal(systems, n_particles, n_particles, edge_attrs)


# H = 16, 48 and 80 take the kernel's partial column blocks; N = 2 is the
# smallest system and N = 13 ends in a partial tile of pairs. With
# x_scale=300 most coordinate products are beyond the clip at 100.
@pytest.mark.parametrize(
    "systems, n_particles, hidden, edge_attrs, x_scale",
    [(3, 2, 16, 1, 1.0), (2, 13, 48, 2, 1.0), (2, 9, 64, 0, 1.0), (1, 12, 80, 3, 1.0), (2, 7, 32, 2, 300.0)],
)
def test_pair_stage_matches_xla(systems, n_particles, hidden, edge_attrs, x_scale):
    inputs = _pair_stage_inputs(0, systems, n_particles, hidden, edge_attrs, x_scale)
    xla = functools.partial(egnn.dense_edge_stage, norm_diff=False, coords_tanh=False)
    fused_outputs, fused_vjp = jax.vjp(cpu_kernel.pair_stage, *inputs)
    xla_outputs, xla_vjp = jax.vjp(xla, *inputs)
    _assert_trees_close(fused_outputs, xla_outputs, rtol=1e-4, atol=1e-5, label="outputs")
    rng = np.random.default_rng(1)
    cotangents = tuple(jnp.asarray(rng.normal(size=out.shape), jnp.float32) for out in xla_outputs)
    _assert_trees_close(fused_vjp(cotangents), xla_vjp(cotangents), rtol=1e-4, atol=1e-5, label="gradients")


def test_pair_stage_rejects_unsupported_inputs():
    weights, receiver_part, sender_part, x, edge_attr = _pair_stage_inputs(0, 1, 4, 16, 2, 1.0)
    with pytest.raises(ValueError, match="float32"):
        cpu_kernel.pair_stage(weights, receiver_part.astype(jnp.bfloat16), sender_part, x, edge_attr)
    odd = _pair_stage_inputs(0, 1, 4, 8, 2, 1.0)
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu_kernel.pair_stage(*odd)


def test_pair_stage_under_vmap_matches_loop():
    """The seed sweep vmaps training over parameter sets; the kernel then runs once per set."""
    stacked = [_pair_stage_inputs(seed, 2, 10, 16, 2, 1.0) for seed in (3, 4)]

    def loss(*inputs):
        incoming, shift = cpu_kernel.pair_stage(*inputs)
        return jnp.sum(jnp.sin(incoming)) + jnp.sum(shift**2)

    grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
    batched = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *stacked)
    vmapped = jax.jit(jax.vmap(grad))(*batched)
    for index, inputs in enumerate(stacked):
        one = jax.tree_util.tree_map(lambda leaf: leaf[index], vmapped)
        _assert_trees_close(one, grad(*inputs), rtol=1e-6, atol=1e-7, label=f"set {index}")


def test_pair_stage_gradients_reproducible():
    """Threads share the systems differently from run to run; the weight gradients must not change."""
    inputs = _pair_stage_inputs(5, 40, 9, 32, 2, 1.0)
    _, vjp = jax.vjp(cpu_kernel.pair_stage, *inputs)
    rng = np.random.default_rng(2)
    cotangents = (
        jnp.asarray(rng.normal(size=(40, 9, 32)), jnp.float32),
        jnp.asarray(rng.normal(size=(40, 9, 3)), jnp.float32),
    )
    first = vjp(cotangents)
    for _ in range(10):
        chex.assert_trees_all_equal(vjp(cotangents), first)


# --- The model on the fused path ----------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_fused_model_matches_naive(config):
    graph = _batch()
    fused = egnn.EGNN(message_passing="fused", **SMALL, **config)
    naive = egnn.EGNN(message_passing="naive", **SMALL, **config)
    params = jax.jit(naive.init)(jax.random.key(1), graph)
    (fused_loss, fused_out), fused_grad = _loss_and_grad(fused)(params, graph)
    (naive_loss, naive_out), naive_grad = _loss_and_grad(naive)(params, graph)
    n_real = NUM_SYSTEMS * N
    scale = np.abs(naive_out[:n_real]).max()
    np.testing.assert_allclose(fused_out[:n_real], naive_out[:n_real], rtol=2e-4, atol=2e-5 * scale)
    np.testing.assert_allclose(fused_loss, naive_loss, rtol=2e-4)
    _assert_trees_close(fused_grad, naive_grad, rtol=2e-4, atol=2e-5, label="grad")
    assert np.all(np.isfinite(fused_out))


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[3], CONFIGS[4]], ids=_config_id)
def test_fused_model_equivariant_float32(config):
    model = egnn.EGNN(message_passing="fused", **SMALL, **config)
    graph = _batch()
    params = jax.jit(model.init)(jax.random.key(2), graph)
    errors = equivariance.equivariance_error(model.apply, params, graph, jax.random.key(5), num_draws=8)
    for kind in ("rotation", "translation", "reflection", "rigid"):
        relative = errors[f"{kind}_max"] / errors["output_scale"]
        assert relative < 1e-5, f"{kind} error {relative:.2e}"


# --- Path choice ----------------------------------------------------------------------------


def _path(model, graph):
    return model._resolve_message_passing(graph)[0]


def test_auto_takes_fused_where_it_fits():
    graph = _batch()
    assert egnn.auto_message_passing((BATCH_SIZE, N), fused_fits=True) == "fused"
    assert _path(egnn.EGNN(**SMALL), graph) == "fused"
    # Each of these leaves the kernel out and falls back to the XLA dense path.
    assert _path(egnn.EGNN(num_layers=2, hidden_dim=8), graph) == "dense"
    assert _path(egnn.EGNN(norm_diff=True, **SMALL), graph) == "dense"
    assert _path(egnn.EGNN(param_dtype=jnp.bfloat16, **SMALL), graph) == "dense"
    small_systems = dict(SMALL, num_particles=egnn.FUSED_MIN_PARTICLES)
    assert _path(egnn.EGNN(**small_systems), _batch(n_particles=egnn.FUSED_MIN_PARTICLES)) == "fused"
    assert _path(egnn.EGNN(**SMALL), _batch(n_particles=egnn.FUSED_MIN_PARTICLES - 1)) == "segment"


def test_auto_message_passing_thresholds():
    dense_only = egnn.DENSE_MIN_PARTICLES
    assert egnn.auto_message_passing((2, egnn.FUSED_MIN_PARTICLES), fused_fits=True) == "fused"
    assert egnn.auto_message_passing((2, egnn.FUSED_MIN_PARTICLES - 1), fused_fits=True) == "segment"
    assert egnn.auto_message_passing((2, dense_only), fused_fits=False) == "dense"
    assert egnn.auto_message_passing((2, dense_only - 1), fused_fits=False) == "segment"
    assert egnn.auto_message_passing(None, fused_fits=True) == "segment"


@pytest.mark.parametrize(
    "options, message",
    [(dict(coords_tanh=True), "coords_tanh"), (dict(hidden_dim=24), "multiple of 16")],
)
def test_forced_fused_names_what_does_not_fit(options, message):
    model = egnn.EGNN(message_passing="fused", **{**SMALL, **options})
    with pytest.raises(ValueError, match=f"message_passing='fused' cannot run: .*{message}"):
        jax.eval_shape(model.init, jax.random.key(0), _batch())


# --- Build and availability -------------------------------------------------------------------


@pytest.fixture
def fresh_kernel_state(monkeypatch, tmp_path):
    """Forget the loaded kernel for one test, with an empty cache directory, and restore it after."""
    monkeypatch.setenv("GEONORM_JAX_KERNEL_CACHE", str(tmp_path))
    cpu_kernel._load.cache_clear()
    cpu_kernel.unavailable_reason.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    cpu_kernel._load.cache_clear()
    cpu_kernel.unavailable_reason.cache_clear()
    assert cpu_kernel.unavailable_reason() is None


def test_compiler_failure_is_reported(fresh_kernel_state, monkeypatch):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    reason = cpu_kernel.unavailable_reason()
    assert reason is not None and "failed to compile" in reason
    assert list(fresh_kernel_state.iterdir()) == []  # no partial library left behind
    with pytest.raises(cpu_kernel.KernelUnavailable, match="failed to compile"):
        cpu_kernel.pair_stage(*_pair_stage_inputs(0, 1, 4, 16, 2, 1.0))
    assert _path(egnn.EGNN(**SMALL), _batch()) == "dense"


def test_missing_compiler_is_reported(fresh_kernel_state, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-geonorm")
    assert "install g++ or set CXX" in cpu_kernel.unavailable_reason()


def test_disable_variable_turns_kernel_off(fresh_kernel_state, monkeypatch):
    monkeypatch.setenv(cpu_kernel.DISABLE_VARIABLE, "1")
    assert cpu_kernel.DISABLE_VARIABLE in cpu_kernel.unavailable_reason()
    model = egnn.EGNN(message_passing="fused", **SMALL)
    with pytest.raises(ValueError, match=cpu_kernel.DISABLE_VARIABLE):
        jax.eval_shape(model.init, jax.random.key(0), _batch())


def test_build_is_cached(fresh_kernel_state):
    assert cpu_kernel.unavailable_reason() is None
    libraries = list(fresh_kernel_state.glob("pair_stage_cpu-*.so"))
    assert len(libraries) == 1
    built = libraries[0].stat().st_mtime_ns
    cpu_kernel._load.cache_clear()
    cpu_kernel.unavailable_reason.cache_clear()
    assert cpu_kernel.unavailable_reason() is None
    assert libraries[0].stat().st_mtime_ns == built


def test_disable_variable_zero_keeps_kernel(fresh_kernel_state, monkeypatch):
    monkeypatch.setenv(cpu_kernel.DISABLE_VARIABLE, "0")
    assert cpu_kernel.unavailable_reason() is None


def test_cache_dir_ignores_empty_xdg_cache_home(monkeypatch):
    monkeypatch.delenv("GEONORM_JAX_KERNEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert cpu_kernel.cache_dir() == Path.home() / ".cache" / "geonorm_jax"
    monkeypatch.setenv("XDG_CACHE_HOME", "/tmp/xdg")
    assert cpu_kernel.cache_dir() == Path("/tmp/xdg/geonorm_jax")
