"""Tests of the charged N-body simulator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geonorm_jax import simulation
from geonorm_jax.simulation import DEFAULT_PARAMS, PhysicsParams


def numpy_trajectory(x0, v0, charges, n_steps, sample_every, dt=0.001, max_force=100.0):
    """Straightforward loop of the generator's integrator, one system, [N, 3] layout."""

    def force(x):
        dx = x[:, None, :] - x[None, :, :]
        r2 = (dx**2).sum(-1)
        np.fill_diagonal(r2, 1.0)
        magnitude = np.outer(charges, charges) / r2**1.5
        np.fill_diagonal(magnitude, 0.0)
        return np.clip((magnitude[:, :, None] * dx).sum(1), -max_force, max_force)

    x, v = x0.copy(), v0.copy()
    v = v + dt * force(x)
    saved_x, saved_v = [], []
    for step in range(1, n_steps):
        x = x + dt * v
        if step % sample_every == 0:
            saved_x.append(x.copy())
            saved_v.append(v.copy())
        v = v + dt * force(x)
    return np.array(saved_x), np.array(saved_v)


def test_simulate_shapes_and_dtypes():
    x, v, charges = simulation.simulate(0, "train", 3, 4, frames=(2, 0), progress=False)
    assert x.shape == (3, 2, 4, 3)
    assert v.shape == (3, 2, 4, 3)
    assert charges.shape == (3, 4)
    assert x.dtype == np.float64
    assert v.dtype == np.float64
    assert charges.dtype == np.float64
    assert set(np.unique(charges)) <= {-1.0, 1.0}


def test_simulate_no_x64_leak():
    simulation.simulate(0, "train", 2, 3, frames=(0,), progress=False)
    assert jnp.ones(1).dtype == jnp.float32


def test_simulate_frame_order_follows_request():
    x_all, v_all, _ = simulation.simulate(0, "train", 3, 4, frames=(0, 1, 2), progress=False)
    x, v, _ = simulation.simulate(0, "train", 3, 4, frames=(2, 0), progress=False)
    np.testing.assert_array_equal(x, x_all[:, [2, 0]])
    np.testing.assert_array_equal(v, v_all[:, [2, 0]])


def test_simulate_matches_numpy_integrator():
    seed, n_particles = 5, 4
    x, v, charges = simulation.simulate(seed, "valid", 2, n_particles, frames=(0, 1, 2), progress=False)
    for index in range(2):
        with jax.enable_x64(True):
            key = simulation.simulation_key(seed, "valid", index)
        x0, v0, q = (np.asarray(a) for a in simulation.initial_state(key, n_particles))
        np.testing.assert_array_equal(q, charges[index])
        expected_x, expected_v = numpy_trajectory(x0, v0, q, n_steps=301, sample_every=100)
        np.testing.assert_allclose(x[index], expected_x, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(v[index], expected_v, rtol=1e-10, atol=1e-12)


def test_simulate_all_frames_by_default():
    x, _, _ = simulation.simulate(1, "test", 2, 3, progress=False)
    assert x.shape == (2, 49, 3, 3)
    assert np.all(np.isfinite(x))


def test_simulate_same_seed_identical():
    first = simulation.simulate(7, "train", 5, 3, frames=(1,), progress=False)
    second = simulation.simulate(7, "train", 5, 3, frames=(1,), progress=False)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_simulate_other_seed_differs():
    x_first, _, _ = simulation.simulate(7, "train", 5, 3, frames=(1,), progress=False)
    x_second, _, _ = simulation.simulate(8, "train", 5, 3, frames=(1,), progress=False)
    assert not np.allclose(x_first, x_second)


def test_simulate_independent_of_chunking():
    whole = simulation.simulate(7, "train", 5, 3, frames=(1,), progress=False)
    chunked = simulation.simulate(7, "train", 5, 3, frames=(1,), chunk_size=2, progress=False)
    for a, b in zip(whole, chunked):
        np.testing.assert_array_equal(a, b)

    # Simulations 2..4 alone, from a start offset, equal rows 2..4.
    tail = simulation.simulate(7, "train", 3, 3, frames=(1,), start=2, chunk_size=2, progress=False)
    for a, b in zip(whole, tail):
        np.testing.assert_array_equal(a[2:], b)


def test_initial_states_differ_between_splits():
    with jax.enable_x64(True):
        starts = {
            split: np.stack(
                [np.asarray(simulation.initial_state(simulation.simulation_key(43, split, i), 5)[0]) for i in range(20)]
            )
            for split in simulation.SPLITS
        }
    rows = np.concatenate([starts[s].reshape(20, -1) for s in simulation.SPLITS])
    assert len(np.unique(rows, axis=0)) == 60


def test_initial_state_speed_and_box():
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.PRNGKey(0), 200)
        x, v, charges = jax.vmap(lambda k: simulation.initial_state(k, 50))(keys)
    x, v, charges = np.asarray(x), np.asarray(v), np.asarray(charges)
    assert x.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(v, axis=-1), 0.5, rtol=1e-14)
    assert np.all(np.abs(x) <= DEFAULT_PARAMS.box_size)
    assert set(np.unique(charges)) == {-1.0, 1.0}
    assert abs(charges.mean()) < 0.05


def test_reflect_into_box_mirrors_and_turns_inwards():
    x = jnp.array([6.0, -7.0, 1.0])
    v = jnp.array([0.3, -0.2, 0.4])
    reflected_x, reflected_v = simulation.reflect_into_box(x, v, 5.0)
    np.testing.assert_allclose(reflected_x, [4.0, -3.0, 1.0])
    np.testing.assert_allclose(reflected_v, [-0.3, 0.2, 0.4])


def test_coulomb_forces_analytic_pair():
    with jax.enable_x64(True):
        x = jnp.array([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
        repel = simulation.coulomb_forces(x, jnp.array([1.0, 1.0]))
        attract = simulation.coulomb_forces(x, jnp.array([1.0, -1.0]))
    # Distance 2: |F| = 1 / 2^2, along the x axis.
    np.testing.assert_allclose(repel, [[-0.25, 0, 0], [0.25, 0, 0]], rtol=1e-15)
    np.testing.assert_allclose(attract, [[0.25, 0, 0], [-0.25, 0, 0]], rtol=1e-15)


def test_coulomb_forces_clipped_per_component():
    with jax.enable_x64(True):
        x = jnp.array([[0.0, 0.0, 0.0], [0.01, 0.01, 0.0]])
        forces = np.asarray(simulation.coulomb_forces(x, jnp.array([1.0, 1.0])))
    np.testing.assert_array_equal(forces[:, :2], [[-100.0, -100.0], [100.0, 100.0]])
    np.testing.assert_array_equal(forces[:, 2], [0.0, 0.0])


def test_coulomb_forces_finite_gradient():
    # The self-term must not produce 0/0 in values or gradients.
    with jax.enable_x64(True):
        x = jnp.array([[0.0, 0.0, 0.0], [1.0, 2.0, 0.5], [-1.5, 0.3, 2.0]])
        charges = jnp.array([1.0, -1.0, 1.0])
        gradient = jax.grad(lambda x: simulation.coulomb_forces(x, charges).sum())(x)
    assert np.all(np.isfinite(gradient))


def test_integrate_step_conserves_momentum():
    # Well separated particles: forces far below the clip, so Newton's third
    # law is exact and the momentum changes only by rounding.
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(6, 3)) * 20.0)
        v = jnp.asarray(rng.normal(size=(6, 3)) * 0.5)
        charges = jnp.asarray(rng.choice([-1.0, 1.0], size=6))
        momentum = np.asarray(v.sum(0))
        step = jax.jit(lambda x, v: simulation.integrate_step(x, v, charges))
        max_force = 0.0
        for _ in range(1000):
            max_force = max(max_force, float(jnp.abs(simulation.coulomb_forces(x, charges)).max()))
            x, v = step(x, v)
        final_momentum = np.asarray(v.sum(0))
    assert final_momentum.dtype == np.float64
    assert max_force < DEFAULT_PARAMS.max_force
    np.testing.assert_allclose(final_momentum, momentum, rtol=0, atol=1e-13)


@pytest.mark.parametrize("charge_product, sign", [(1.0, 1.0), (-1.0, -1.0)])
def test_trajectory_pair_moves_along_axis(charge_product, sign):
    x0 = np.array([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    v0 = np.zeros((2, 3))
    charges = np.array([1.0, charge_product])
    x, v = simulation.trajectory(x0, v0, charges, frames=(0, 1))
    assert x.shape == (2, 2, 3)

    # Motion stays on the x axis, symmetric about the origin.
    np.testing.assert_array_equal(x[..., 1:], 0.0)
    np.testing.assert_allclose(x[:, 0, 0], -x[:, 1, 0], rtol=1e-14)

    # Repulsion increases the separation, attraction decreases it.
    separation = x[:, 1, 0] - x[:, 0, 0]
    assert sign * (separation[0] - 2.0) > 0
    assert sign * (separation[1] - separation[0]) > 0
    assert sign * v[1, 1, 0] > 0

    # After 100 steps the displacement is about F t^2 / 2 with |F| = 1/4.
    np.testing.assert_allclose(abs(x[0, 1, 0] - 1.0), 0.25 * 0.1**2 / 2, rtol=0.05)


def test_simulate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least 2"):
        simulation.simulate(0, "train", 2, 1, progress=False)
    with pytest.raises(ValueError, match="unknown split"):
        simulation.simulate(0, "training", 2, 3, progress=False)
    with pytest.raises(ValueError, match="outside"):
        simulation.simulate(0, "train", 2, 3, frames=(49,), progress=False)
    with pytest.raises(ValueError, match="duplicates"):
        simulation.check_frames((3, 3))
    with pytest.raises(ValueError, match="chunk_size"):
        simulation.simulate(0, "train", 2, 3, chunk_size=0, progress=False)


def test_physics_params_frame_count():
    assert DEFAULT_PARAMS.n_frames == 49
    assert PhysicsParams(n_steps=1000, sample_every=100).n_frames == 9
    assert DEFAULT_PARAMS.loc_std(5) == pytest.approx(1.0)
    assert DEFAULT_PARAMS.loc_std(40) == pytest.approx(2.0)


def test_statistics_match_reference_n5():
    # Reference generator at N=5, frame 30: mean |x| 2.64, mean |v| 0.92,
    # mean displacement 30 -> 40 of 0.81. Over 2000 systems, quarters of 500
    # systems spread by about 1.5% around the mean, so the standard error of
    # the full mean is below 1%. The 4% tolerance also covers the sampling
    # error of the reference figures.
    x, v, _ = simulation.simulate(43, "train", 2000, 5, frames=(30, 40), progress=False)
    mean_position = np.linalg.norm(x[:, 0], axis=-1).mean()
    mean_speed = np.linalg.norm(v[:, 0], axis=-1).mean()
    mean_displacement = np.linalg.norm(x[:, 1] - x[:, 0], axis=-1).mean()
    assert mean_position == pytest.approx(2.64, rel=0.04)
    assert mean_speed == pytest.approx(0.92, rel=0.04)
    assert mean_displacement == pytest.approx(0.81, rel=0.04)
