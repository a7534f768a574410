"""Tests of geonorm_jax.norms: GeoNorm, ScaleNorm and LayerNorm on coordinates."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geonorm_jax import geometry, graphs, norms

N = 5
NUM_FEATURES = 2
MODES_AND_SIGMAS = [(mode, sigma) for mode in norms.MODES for sigma in norms.SIGMAS]


def _random_params(mode, key, n_particles=N, dtype=jnp.float32):
    """GeoNorm parameters away from the init, so that g and b both matter."""
    params = norms.geonorm_init(n_particles, mode, num_features=NUM_FEATURES, dtype=dtype)
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    noisy = [leaf + 0.5 * jax.random.normal(k, leaf.shape, dtype) for leaf, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, noisy)


def _systems(key, batch=4, n_particles=N, dtype=jnp.float32):
    """Positions [B, N, 3], input centroids [B, 3] and invariant features [B, N, F]."""
    x_key, mu0_key, h_key = jax.random.split(key, 3)
    x = 2.0 * jax.random.normal(x_key, (batch, n_particles, 3), dtype)
    mu0 = x.mean(axis=1) + jax.random.normal(mu0_key, (batch, 3), dtype)
    h = jax.random.uniform(h_key, (batch, n_particles, NUM_FEATURES), dtype)
    return x, mu0, h


# --- Parameters -----------------------------------------------------------------


def test_geonorm_init_shapes_and_values():
    particle = norms.geonorm_init(N, "particle")
    np.testing.assert_array_equal(particle["g"], np.ones(N))
    np.testing.assert_array_equal(particle["b"], np.zeros(N))
    shared = norms.geonorm_init(None, "shared")
    chex.assert_shape([shared["g"], shared["b"]], ())
    adaptive = norms.geonorm_init(None, "adaptive", num_features=3)
    chex.assert_shape(adaptive["kernel"], (3, 2))
    np.testing.assert_array_equal(adaptive["bias"], [1.0, 0.0])


def test_adaptive_init_gives_unit_scale_zero_bias():
    params = norms.geonorm_init(None, "adaptive", num_features=NUM_FEATURES)
    x, _, h = _systems(jax.random.key(0))
    g, b = norms.resolve_affine(params, x, h=h)
    np.testing.assert_array_equal(g, np.ones((4, N, 1)))
    np.testing.assert_array_equal(b, np.zeros((4, N, 1)))


def test_geonorm_init_rejects_missing_arguments():
    with pytest.raises(ValueError, match="n_particles"):
        norms.geonorm_init(None, "particle")
    with pytest.raises(ValueError, match="num_features"):
        norms.geonorm_init(None, "adaptive")
    with pytest.raises(ValueError, match="invalid mode"):
        norms.geonorm_init(N, "global")


def test_geonorm_apply_rejects_wrong_particle_count():
    params = norms.geonorm_init(N + 1, "particle")
    x, mu0, _ = _systems(jax.random.key(0))
    with pytest.raises(ValueError, match="n_particles=5"):
        norms.geonorm_apply(params, x, mu0)


def test_geonorm_apply_adaptive_needs_h():
    params = norms.geonorm_init(None, "adaptive", num_features=NUM_FEATURES)
    x, mu0, _ = _systems(jax.random.key(0))
    with pytest.raises(ValueError, match="invariant features h"):
        norms.geonorm_apply(params, x, mu0)


def test_geonorm_apply_rejects_invalid_sigma():
    x, mu0, _ = _systems(jax.random.key(0))
    with pytest.raises(ValueError, match="invalid sigma"):
        norms.geonorm_apply(norms.geonorm_init(N), x, mu0, sigma="global")


# --- Values ---------------------------------------------------------------------


def test_geonorm_matches_formula():
    x, mu0, _ = _systems(jax.random.key(1), batch=1)
    x, mu0 = x[0], mu0[0]
    params = _random_params("particle", jax.random.key(2))
    out = norms.geonorm_apply(params, x, mu0, eps=0.0)

    mu = x.mean(axis=0)
    sigma = np.linalg.norm(x - mu, axis=-1, keepdims=True)
    drift = mu - mu0
    expected = params["g"][:, None] * (x - mu) / sigma + params["b"][:, None] * drift / np.linalg.norm(drift) + mu0
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_geonorm_sigma_particle_puts_particles_on_spheres():
    x, mu0, _ = _systems(jax.random.key(3))
    params = norms.geonorm_init(N)
    out = norms.geonorm_apply(params, x, mu0, eps=0.0)
    # With b = 0 every particle lands at distance |g_i| = 1 from mu0.
    np.testing.assert_allclose(jnp.linalg.norm(out - mu0[:, None, :], axis=-1), 1.0, rtol=1e-5)


def test_geonorm_sigma_system_keeps_shape():
    x, mu0, _ = _systems(jax.random.key(4))
    params = norms.geonorm_init(None, "shared")
    out = norms.geonorm_apply(params, x, mu0, eps=0.0, sigma="system")
    centered = x - x.mean(axis=1, keepdims=True)
    rms = jnp.sqrt(jnp.mean(jnp.sum(centered**2, axis=-1), axis=1))
    np.testing.assert_allclose(out - mu0[:, None, :], centered / rms[:, None, None], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode, sigma", MODES_AND_SIGMAS)
def test_geonorm_apply_batch_equals_vmap(mode, sigma):
    x, mu0, h = _systems(jax.random.key(5))
    params = _random_params(mode, jax.random.key(6))
    apply = functools.partial(norms.geonorm_apply, params, sigma=sigma)
    batched = jax.jit(apply)(x, mu0, h=h)
    one_by_one = jax.vmap(lambda xs, m, hs: apply(xs, m, h=hs))(x, mu0, h)
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode, sigma", MODES_AND_SIGMAS)
def test_geonorm_segment_equals_batched(mode, sigma):
    batch = 3
    x, mu0, h = _systems(jax.random.key(7), batch=batch)
    params = _random_params(mode, jax.random.key(8))
    graph = graphs.build_graphs(np.asarray(x), np.zeros(x.shape), np.ones((batch, N)), batch_size=batch + 2)
    index = geometry.system_index(graph)
    n_real = batch * N
    n_total = graph.nodes["x"].shape[0]
    h_nodes = jnp.zeros((n_total, NUM_FEATURES)).at[:n_real].set(h.reshape(-1, NUM_FEATURES))
    mu0_graphs = jnp.zeros((index.num_graphs, 3)).at[:batch].set(mu0)

    segment = norms.geonorm_segment_apply(params, graph.nodes["x"], mu0_graphs, index, h=h_nodes, sigma=sigma)
    dense = norms.geonorm_apply(params, x, mu0, h=h, sigma=sigma)
    chex.assert_shape(segment, (n_total, 3))
    np.testing.assert_allclose(segment[:n_real], dense.reshape(-1, 3), rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(segment))


@pytest.mark.parametrize("mode, sigma", MODES_AND_SIGMAS)
def test_geonorm_module_matches_function(mode, sigma):
    x, mu0, h = _systems(jax.random.key(9))
    module = norms.GeoNorm(mode=mode, sigma=sigma, num_particles=N)
    variables = module.init(jax.random.key(0), x, mu0, h=h)
    params = _random_params(mode, jax.random.key(10))
    chex.assert_trees_all_equal_shapes(variables["params"], params)
    np.testing.assert_allclose(
        module.apply({"params": params}, x, mu0, h=h),
        norms.geonorm_apply(params, x, mu0, h=h, sigma=sigma),
        rtol=1e-6,
    )


# --- Equivariance ---------------------------------------------------------------


def _geonorm_equivariance_errors(mode, sigma, dtype, num_draws=64):
    """Max |F(Q x + t) - (Q F(x) + t)| over draws of rotations, reflections and translations."""
    x, mu0, h = _systems(jax.random.key(11), dtype=dtype)
    params = _random_params(mode, jax.random.key(12), dtype=dtype)
    apply = functools.partial(norms.geonorm_apply, params, h=h, sigma=sigma)
    base = apply(x, mu0)

    def error(key):
        rotation_key, reflection_key, translation_key = jax.random.split(key, 3)
        translation = geometry.random_translation(translation_key, scale=5.0, dtype=dtype)
        errors = []
        for matrix in (geometry.random_rotation(rotation_key, dtype), geometry.random_reflection(reflection_key, dtype)):
            moved = apply(geometry.transform_positions(x, matrix, translation), mu0 @ matrix.T + translation)
            errors.append(jnp.abs(moved - geometry.transform_positions(base, matrix, translation)).max())
        return jnp.stack(errors)

    errors = jax.jit(jax.vmap(error))(jax.random.split(jax.random.key(13), num_draws))
    return errors.max(axis=0), jnp.abs(base).max()


@pytest.mark.parametrize("mode, sigma", MODES_AND_SIGMAS)
def test_geonorm_equivariant_float32(mode, sigma):
    (rotation_error, reflection_error), scale = _geonorm_equivariance_errors(mode, sigma, jnp.float32)
    assert rotation_error < 1e-5 * scale
    assert reflection_error < 1e-5 * scale


@pytest.mark.parametrize("mode, sigma", MODES_AND_SIGMAS)
def test_geonorm_equivariant_float64(mode, sigma):
    with jax.enable_x64(True):
        (rotation_error, reflection_error), scale = _geonorm_equivariance_errors(mode, sigma, jnp.float64)
        assert rotation_error < 1e-12 * scale
        assert reflection_error < 1e-12 * scale


def test_scalenorm_rotation_but_not_translation_equivariant():
    x, _, _ = _systems(jax.random.key(14))
    g = jnp.full((N, 1), 1.5)
    rotation = geometry.random_rotation(jax.random.key(15))
    translation = jnp.array([3.0, -4.0, 0.0])
    base = norms.scalenorm(x, g)
    rotated = norms.scalenorm(x @ rotation.T, g)
    translated = norms.scalenorm(x + translation, g)
    assert jnp.abs(rotated - base @ rotation.T).max() < 1e-5
    assert jnp.abs(translated - (base + translation)).max() > 1e-2
    np.testing.assert_allclose(jnp.linalg.norm(base, axis=-1), 1.5, rtol=1e-5)


def test_scalenorm_rms_is_l2_times_sqrt3():
    x, _, _ = _systems(jax.random.key(16))
    np.testing.assert_allclose(
        norms.scalenorm(x, 1.0, kind="rms", eps=0.0), np.sqrt(3.0) * norms.scalenorm(x, 1.0, eps=0.0), rtol=1e-5
    )


def test_layernorm_neither_rotation_nor_translation_equivariant():
    x, _, _ = _systems(jax.random.key(17))
    g = jnp.ones((N, 1))
    b = jnp.zeros((N, 3))
    rotation = geometry.random_rotation(jax.random.key(18))
    translation = jnp.array([3.0, -4.0, 1.0])
    base = norms.coordinate_layernorm(x, g, b)
    rotated = norms.coordinate_layernorm(x @ rotation.T, g, b)
    translated = norms.coordinate_layernorm(x + translation, g, b)
    assert jnp.abs(rotated - base @ rotation.T).max() > 1e-2
    assert jnp.abs(translated - (base + translation)).max() > 1e-2


def test_layernorm_standardizes_each_particle():
    x, _, _ = _systems(jax.random.key(19))
    out = norms.coordinate_layernorm(x, 1.0, 0.0, eps=0.0)
    np.testing.assert_allclose(out.mean(axis=-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=-1), 1.0, rtol=1e-4)


def test_geonorm_direction_is_rounding_noise_float32():
    # In float64 the direction of a drift of about 1 float32 ulp is exact.
    # In float32 the same drift is quantized, so its unit direction is far off.
    with jax.enable_x64(True):
        x, mu0, _ = _systems(jax.random.key(20), batch=1, dtype=jnp.float64)
        x = x[0] + 3.0
        true_drift = 2e-7 * jnp.array([0.3, 0.5, 0.81])
        mu0 = x.mean(axis=0) - true_drift
        params = {"g": jnp.zeros((), jnp.float64), "b": jnp.ones((), jnp.float64)}

        exact = norms.geonorm_apply(params, x, mu0, eps=0.0) - mu0  # the direction term alone
        np.testing.assert_allclose(exact[0], true_drift / jnp.linalg.norm(true_drift), rtol=1e-6)

        x32 = x.astype(jnp.float32)
        mu0_32 = mu0.astype(jnp.float32)
        noisy = norms.geonorm_apply(jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), params), x32, mu0_32, eps=0.0)
        noisy_direction = (noisy - mu0_32)[0].astype(jnp.float64)
        cosine = noisy_direction @ exact[0] / jnp.linalg.norm(noisy_direction)
        assert cosine < 0.99

        # The default eps shrinks such a direction to almost nothing.
        damped = norms.geonorm_apply(jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), params), x32, mu0_32)
        assert jnp.linalg.norm(damped[0] - mu0_32) < 1e-2


# --- Degenerate inputs: values and gradients finite -----------------------------


def _degenerate_cases():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 3)).astype(np.float32)
    on_centroid = x.copy()
    # Particle 0 at the mean of the others is also at the centroid of all N.
    on_centroid[0] = on_centroid[1:].mean(axis=0)
    return {
        "mu_equals_mu0": (x, x.mean(axis=0)),
        "particle_on_centroid": (on_centroid, on_centroid.mean(axis=0) + 0.5),
        "all_coincide": (np.ones((N, 3), np.float32), np.ones(3, np.float32)),
        "all_at_origin": (np.zeros((N, 3), np.float32), np.zeros(3, np.float32)),
    }


@pytest.mark.parametrize("case", list(_degenerate_cases()))
@pytest.mark.parametrize("mode, sigma", MODES_AND_SIGMAS)
@pytest.mark.parametrize("eps", [0.0, norms.DEFAULT_EPS])
def test_geonorm_degenerate_finite(case, mode, sigma, eps):
    x, mu0 = map(jnp.asarray, _degenerate_cases()[case])
    h = jnp.ones((N, NUM_FEATURES))
    params = _random_params(mode, jax.random.key(21))

    def loss(params, x):
        return jnp.sum(norms.geonorm_apply(params, x, mu0, h=h, eps=eps, sigma=sigma) ** 2)

    value, (params_grad, x_grad) = jax.value_and_grad(loss, argnums=(0, 1))(params, x)
    assert np.isfinite(value)
    chex.assert_tree_all_finite(params_grad)
    assert np.all(np.isfinite(x_grad))


@pytest.mark.parametrize("sigma", norms.SIGMAS)
def test_geonorm_direction_zero_when_mu_equals_mu0(sigma):
    x = jax.random.normal(jax.random.key(22), (N, 3))
    params = {"g": jnp.zeros(()), "b": jnp.ones(())}
    out = norms.geonorm_apply(params, x, x.mean(axis=0), eps=0.0, sigma=sigma)
    np.testing.assert_array_equal(out, jnp.broadcast_to(x.mean(axis=0), x.shape))


@pytest.mark.parametrize("mode, sigma", MODES_AND_SIGMAS)
def test_geonorm_single_particle_finite(mode, sigma):
    x = jnp.array([[1.0, 2.0, 3.0]])
    params = _random_params(mode, jax.random.key(23), n_particles=1)
    h = jnp.ones((1, NUM_FEATURES))
    gradient = jax.grad(lambda p, y: norms.geonorm_apply(p, y, jnp.zeros(3), h=h, sigma=sigma).sum(), (0, 1))(params, x)
    chex.assert_tree_all_finite(gradient)


@pytest.mark.parametrize("mode, sigma", MODES_AND_SIGMAS)
def test_geonorm_segment_padding_graphs_finite(mode, sigma):
    graph = graphs.build_graphs(np.ones((2, N, 3)), np.zeros((2, N, 3)), np.ones((2, N)), batch_size=4)
    index = geometry.system_index(graph)
    assert int(index.n_node[-1]) == 0  # an empty padding graph
    n_total = graph.nodes["x"].shape[0]
    h = jnp.ones((n_total, NUM_FEATURES))
    mu0 = geometry.segment_centroid(graph.nodes["x"], index)
    params = _random_params(mode, jax.random.key(24))

    def loss(params, x):
        return jnp.sum(norms.geonorm_segment_apply(params, x, mu0, index, h=h, sigma=sigma) ** 2)

    gradient = jax.grad(loss, argnums=(0, 1))(params, graph.nodes["x"])
    chex.assert_tree_all_finite(gradient)


@pytest.mark.parametrize("eps", [0.0, norms.DEFAULT_EPS])
def test_baseline_norms_at_origin_finite(eps):
    x = jnp.zeros((N, 3))

    def loss(x):
        scaled = norms.scalenorm(x, 1.0, eps=eps) + norms.scalenorm(x, 1.0, kind="rms", eps=eps)
        return jnp.sum(scaled**2) + jnp.sum(norms.coordinate_layernorm(x, 1.0, 0.0, eps=eps) ** 2)

    value, gradient = jax.value_and_grad(loss)(x)
    assert np.isfinite(value)
    assert np.all(np.isfinite(gradient))


@pytest.mark.parametrize("module_class", [norms.CoordinateLayerNorm, norms.ScaleNorm])
@pytest.mark.parametrize("mode", norms.MODES)
def test_baseline_modules_segment_equals_dense(module_class, mode):
    batch = 2
    x, _, h = _systems(jax.random.key(25), batch=batch)
    module = module_class(mode=mode, num_particles=N)
    variables = module.init(jax.random.key(0), x, h=h)
    variables = jax.tree_util.tree_map(lambda p: p + 0.3, variables)
    graph = graphs.build_graphs(np.asarray(x), np.zeros(x.shape), np.ones((batch, N)), batch_size=batch)
    index = geometry.system_index(graph)
    n_real = batch * N
    h_nodes = jnp.zeros((graph.nodes["x"].shape[0], NUM_FEATURES)).at[:n_real].set(h.reshape(-1, NUM_FEATURES))
    dense = module.apply(variables, x, h=h)
    segment = module.apply(variables, graph.nodes["x"], index, h=h_nodes)
    np.testing.assert_allclose(segment[:n_real], dense.reshape(-1, 3), rtol=1e-5, atol=1e-6)
