"""Charged N-body simulator in JAX, matching the reference data generator.

The physics follows the charged-particle generator of the reference EGNN code
(vgsatorras/egnn, ``n_body_system``): N particles of unit mass with charges
+1 or -1 (probability 1/2 each) interact by the Coulomb force

    F_i = sum_j q_i q_j (x_i - x_j) / |x_i - x_j|^3,

each Cartesian component of F_i clipped to ``[-max_force, max_force]``. The
integrator is a kick-drift scheme with step ``dt``: a first kick
``v += dt F(x0)``, then at every step ``x += dt v``, the frame is saved if
due, and ``v += dt F(x)``. Frame ``k`` (0-based) is the state after step
``sample_every * (k + 1)``; the initial state is not a frame. A saved velocity
is therefore the one that moved the positions into that step.

:func:`simulate`, :func:`trajectory` and :func:`initial_state` compute in
float64 inside a ``jax.enable_x64(True)`` scope, so 64-bit mode does not leak
into the caller's code. :func:`coulomb_forces` and :func:`integrate_step`
compute in the dtype of their inputs. The
hot loop works on a channel-first layout ``[C, 3, N]`` (C simulations) so that
pairwise differences are contiguous along the particle axis; the public
functions take and return the ``[..., N, 3]`` layout used everywhere else.

Random numbers: simulation ``index`` of ``split`` draws from
``fold_in(fold_in(PRNGKey(seed), split_id), index)``, so a dataset depends
only on ``(seed, split, index)``, never on the chunk size, and the splits draw
from disjoint streams.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
"""Split names; the position in this tuple is the split id folded into the key."""


@dataclasses.dataclass(frozen=True)
class PhysicsParams:
    """Physical and numerical constants of the charged N-body system.

    The defaults are those of the reference generator. Lengths and times are
    in the generator's arbitrary units, charges and masses are 1 in size.
    """

    box_size: float = 5.0
    """Half-width of the box; applied by reflection to the initial state only."""
    velocity_norm: float = 0.5
    """Initial speed of every particle."""
    interaction_strength: float = 1.0
    """Prefactor of the Coulomb force."""
    max_force: float = 100.0
    """Clip of each force component (the reference uses ``0.1 / dt``)."""
    dt: float = 0.001
    """Integrator time step."""
    n_steps: int = 5000
    """Steps of a full trajectory; frames exist for steps up to ``n_steps - 1``."""
    sample_every: int = 100
    """Steps between saved frames."""

    @property
    def n_frames(self) -> int:
        """Number of frames of a full trajectory (49 for the defaults)."""
        return self.n_steps // self.sample_every - 1

    def loc_std(self, n_particles: int) -> float:
        """Return the std of the initial positions, ``(N / 5)^(1/3)``.

        The volume of the initial cloud grows with N so that the density
        matches the 5-particle system.
        """
        return (n_particles / 5.0) ** (1.0 / 3.0)


DEFAULT_PARAMS = PhysicsParams()


def split_id(split: str) -> int:
    """Return the integer id of a split name (``train``, ``valid`` or ``test``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return SPLITS.index(split)


# ---------------------------------------------------------------------------
# Channel-first kernels: x, v [..., 3, N], charges [..., N]. Traced in float64.


def _forces_channel_first(x, charges, strength, max_force):
    n_particles = x.shape[-1]

    # dx[..., k, j, i] = x_i - x_j with the receiver i on the minor axis: the
    # sum over senders j is then a column reduction that XLA vectorizes over
    # i, about 1.2x faster at N=100 than reducing over the minor axis.
    dx = x[..., :, None, :] - x[..., :, :, None]  # [..., 3, N, N]
    r2 = jnp.sum(dx * dx, axis=-3)  # [..., N, N], symmetric

    # Adding 1 on the diagonal makes the self-term finite (1/1^3) without a
    # where; dx is exactly 0 there, so the self-term contributes 0 force.
    r2 = r2 + jnp.eye(n_particles, dtype=x.dtype)
    inv_r = lax.rsqrt(r2)
    charge_products = charges[..., :, None] * charges[..., None, :]  # [..., N, N]
    magnitude = (strength * charge_products) * (inv_r * inv_r * inv_r)

    forces = jnp.sum(magnitude[..., None, :, :] * dx, axis=-2)  # [..., 3, N]
    return jnp.clip(forces, -max_force, max_force)


def reflect_into_box(x, v, box_size: float):
    """Mirror positions beyond ``+-box_size`` at the wall and turn the velocity inwards.

    Elementwise on arrays of any matching shape: a coordinate ``x > L``
    becomes ``2L - x`` with velocity component ``-|v|``, and ``x < -L``
    becomes ``-2L - x`` with ``+|v|``. The generator applies it once, to the
    initial state. Jit- and vmap-able.
    """
    over = x > box_size
    x = jnp.where(over, 2.0 * box_size - x, x)
    v = jnp.where(over, -jnp.abs(v), v)
    under = x < -box_size
    x = jnp.where(under, -2.0 * box_size - x, x)
    v = jnp.where(under, jnp.abs(v), v)
    return x, v


def _initial_state_channel_first(key, n_particles, params: PhysicsParams):
    key_charge, key_x, key_v = jax.random.split(key, 3)
    charges = jnp.where(jax.random.bernoulli(key_charge, 0.5, (n_particles,)), 1.0, -1.0)
    x = jax.random.normal(key_x, (3, n_particles), dtype=jnp.float64) * params.loc_std(n_particles)
    direction = jax.random.normal(key_v, (3, n_particles), dtype=jnp.float64)
    speed = jnp.sqrt(jnp.sum(direction * direction, axis=0, keepdims=True))
    v = direction * (params.velocity_norm / speed)
    x, v = reflect_into_box(x, v, params.box_size)
    return x, v, charges


def _trajectory_channel_first(x, v, charges, n_frames: int, params: PhysicsParams, unroll: int):
    """Integrate ``[..., 3, N]`` states and return the first ``n_frames`` frames.

    Returns ``x, v`` of shape ``[n_frames, ..., 3, N]``.
    """
    dt = params.dt

    def force(x):
        return _forces_channel_first(x, charges, params.interaction_strength, params.max_force)

    def full_step(_, state):
        x, v = state
        x = x + dt * v
        return x, v + dt * force(x)

    def frame(state, _):
        # sample_every - 1 full steps, then the step whose drift lands on the
        # frame: the state is saved between its drift and its kick.
        x, v = lax.fori_loop(0, params.sample_every - 1, full_step, state, unroll=unroll)
        x = x + dt * v
        saved = (x, v)
        return (x, v + dt * force(x)), saved

    v = v + dt * force(x)
    _, (xs, vs) = lax.scan(frame, (x, v), None, length=n_frames)
    return xs, vs


# NOTE: XLA's CPU backend (jax 0.10.2) routes the force kernel to its
# experimental YNNPACK fusion. In a micro-benchmark of 500 steps at N=100 on a
# 2-core AMD EPYC, that fusion was about 1.5x slower than the default loop
# emitter. The option applies only to the simulator's jitted functions. It
# names a CPU debug option, so other backends should ignore it, but that is
# untested. A jaxlib without this debug option rejects it at compile time.
_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


# ---------------------------------------------------------------------------
# Public per-system functions in the [..., N, 3] layout.


def coulomb_forces(x, charges, params: PhysicsParams = DEFAULT_PARAMS) -> jax.Array:
    """Compute the clipped Coulomb forces on every particle.

    Args:
      x: positions ``[..., N, 3]``.
      charges: charges ``[..., N]``.
      params: interaction strength and force clip.

    Returns:
      Forces ``[..., N, 3]`` in the dtype of ``x`` (use float64 inputs under
      ``jax.enable_x64(True)`` to reproduce the generator). Jit- and
      vmap-able. Coincident distinct particles give NaN, as in the reference.
    """
    forces = _forces_channel_first(
        jnp.swapaxes(x, -1, -2), charges, params.interaction_strength, params.max_force
    )
    return jnp.swapaxes(forces, -1, -2)


def integrate_step(x, v, charges, params: PhysicsParams = DEFAULT_PARAMS):
    """Advance the state by one integrator step: ``x += dt v``, then ``v += dt F(x)``.

    ``v`` is the already-kicked velocity, so repeated calls after a first
    kick ``v += dt F(x0)`` reproduce the generator. Shapes: ``x, v`` are
    ``[..., N, 3]``, charges ``[..., N]``; returns ``(x, v)`` of the same shapes.
    Jit- and vmap-able.
    """
    x = x + params.dt * v
    return x, v + params.dt * coulomb_forces(x, charges, params)


def initial_state(key, n_particles: int, params: PhysicsParams = DEFAULT_PARAMS):
    """Draw one initial state.

    Charges are +1 or -1 with probability 1/2. Positions are Gaussian times
    ``params.loc_std(N)``, and velocities are Gaussian directions scaled to
    speed ``params.velocity_norm``. Then positions beyond the box are
    reflected by :func:`reflect_into_box`.

    Args:
      key: a JAX PRNG key.
      n_particles: N (static).

    Returns:
      ``(x [N, 3], v [N, 3], charges [N])``, float64. Runs under
      ``jax.enable_x64(True)`` itself; jit-able only if the caller enables x64.
    """
    with jax.enable_x64(True):
        x, v, charges = _initial_state_channel_first(key, n_particles, params)
        return x.T, v.T, charges


def simulation_key(seed: int, split: str, index):
    """Return the PRNG key of simulation ``index`` of ``split`` for ``seed``.

    ``index`` may be a traced integer. The key never depends on how the
    simulations are chunked. Call under ``jax.enable_x64(True)`` to get the
    keys :func:`simulate` uses.
    """
    return _key(seed, split_id(split), index)


def _key(seed, split_index, index):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), split_index)
    return jax.random.fold_in(key, index)


def trajectory(x0, v0, charges, frames, params: PhysicsParams = DEFAULT_PARAMS):
    """Integrate from initial states and return the requested frames.

    Args:
      x0, v0: initial positions and velocities ``[..., N, 3]``.
      charges: ``[..., N]``.
      frames: sorted or unsorted tuple of frame indices in ``[0, n_frames)``.

    Returns:
      ``(x, v)`` of shape ``[..., F, N, 3]`` float64, frames in the order
      given. Runs in float64 itself; not jit-able (it jits internally).
    """
    frames = check_frames(frames, params)
    with jax.enable_x64(True):
        x0 = jnp.asarray(x0, jnp.float64)
        v0 = jnp.asarray(v0, jnp.float64)
        charges = jnp.asarray(charges, jnp.float64)
        x, v = _trajectory_jit(
            jnp.swapaxes(x0, -1, -2), jnp.swapaxes(v0, -1, -2), charges, frames, params
        )
        return np.asarray(x), np.asarray(v)


@functools.partial(jax.jit, static_argnames=("frames", "params"), compiler_options=_COMPILER_OPTIONS)
def _trajectory_jit(x, v, charges, frames, params):
    xs, vs = _trajectory_channel_first(x, v, charges, max(frames) + 1, params, unroll=1)
    index = jnp.asarray(frames)
    # [F, ..., 3, N] -> [..., F, N, 3]
    xs = jnp.moveaxis(jnp.swapaxes(xs[index], -1, -2), 0, -3)
    vs = jnp.moveaxis(jnp.swapaxes(vs[index], -1, -2), 0, -3)
    return xs, vs


# ---------------------------------------------------------------------------
# Chunked dataset generation.


def check_frames(frames, params: PhysicsParams = DEFAULT_PARAMS) -> tuple[int, ...]:
    """Return ``frames`` as a tuple of ints, or all frame indices if None.

    Raises:
      ValueError: on an empty tuple, duplicates, or an index outside
        ``[0, params.n_frames)``.
    """
    if frames is None:
        return tuple(range(params.n_frames))
    frames = tuple(int(f) for f in frames)
    if not frames:
        raise ValueError("frames is empty; pass None for all frames")
    for frame in frames:
        if not 0 <= frame < params.n_frames:
            raise ValueError(f"frame {frame} is outside [0, {params.n_frames}) for {params.n_steps} steps")
    if len(set(frames)) != len(frames):
        raise ValueError(f"frames contain duplicates: {frames}")
    return frames


@functools.partial(
    jax.jit,
    static_argnames=("n_simulations", "n_particles", "frames", "params", "unroll"),
    compiler_options=_COMPILER_OPTIONS,
)
def _simulate_chunk(seed, split_index, start, *, n_simulations, n_particles, frames, params, unroll):
    """Simulate ``n_simulations`` consecutive indices from ``start``.

    Returns ``x, v [C, F, N, 3]`` and ``charges [C, N]``, float64.
    """
    indices = start + jnp.arange(n_simulations)
    keys = jax.vmap(lambda i: _key(seed, split_index, i))(indices)
    x0, v0, charges = jax.vmap(lambda k: _initial_state_channel_first(k, n_particles, params))(keys)

    xs, vs = _trajectory_channel_first(x0, v0, charges, max(frames) + 1, params, unroll)
    index = jnp.asarray(frames)
    # [F, C, 3, N] -> [C, F, N, 3]
    xs = jnp.transpose(xs[index], (1, 0, 3, 2))
    vs = jnp.transpose(vs[index], (1, 0, 3, 2))
    return xs, vs, charges


def default_chunk_size(n_particles: int) -> int:
    """Return the chunk size (simulations per compiled call) for N particles.

    NOTE: tuned on a 2-core AMD EPYC with jax 0.10.2 (CPU backend). There,
    chunks of about 200,000 particle pairs (20 systems at N=100) ran as fast
    as larger ones, and half that size was about 15% slower. Larger chunks
    cost memory and make the progress bar coarser.
    """
    pairs_target = 200_000
    return int(max(8, min(1000, pairs_target // (n_particles * n_particles))))


def simulate(
    seed: int,
    split: str,
    n_simulations: int,
    n_particles: int,
    *,
    frames=None,
    params: PhysicsParams = DEFAULT_PARAMS,
    start: int = 0,
    chunk_size: int | None = None,
    unroll: int = 4,
    progress: bool = True,
):
    """Generate charged N-body trajectories for one split.

    Args:
      seed: base seed of the dataset.
      split: ``"train"``, ``"valid"`` or ``"test"``.
      n_simulations: S, number of trajectories.
      n_particles: N (at least 2).
      frames: frame indices to keep, or None for all ``params.n_frames``.
        Only the steps up to the largest kept frame are simulated.
      params: physical constants.
      start: index of the first simulation; simulations ``start ..
        start + S - 1`` are identical whatever the ``start`` and chunk size.
      chunk_size: simulations per compiled call (default
        :func:`default_chunk_size`). Does not change the results.
      unroll: unroll factor of the inner step loop (speed only).
      progress: show a tqdm progress bar.

    Returns:
      ``(x, v, charges)``: numpy float64 ``x, v [S, F, N, 3]`` with frames in
      the order given, and ``charges [S, N]`` with values +1 or -1.
      Host-side; not jit-able (each chunk is one jitted call).
    """
    split_id(split)
    if n_particles < 2:
        raise ValueError(f"n_particles must be at least 2, got {n_particles}")
    if n_simulations < 0:
        raise ValueError(f"n_simulations must be non-negative, got {n_simulations}")
    frames = check_frames(frames, params)
    if chunk_size is None:
        chunk_size = default_chunk_size(n_particles)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")

    x = np.empty((n_simulations, len(frames), n_particles, 3), np.float64)
    v = np.empty_like(x)
    charges = np.empty((n_simulations, n_particles), np.float64)
    begin = time.perf_counter()
    with jax.enable_x64(True), tqdm(
        total=n_simulations, desc=f"simulate {split} N={n_particles}", unit="sim", disable=not progress
    ) as bar:
        for offset in range(0, n_simulations, chunk_size):
            size = min(chunk_size, n_simulations - offset)
            # The last chunk is padded to the full chunk size, so one
            # compilation serves the whole split; the extra rows are dropped.
            xs, vs, qs = _simulate_chunk(
                jnp.asarray(seed, jnp.int64),
                jnp.asarray(split_id(split), jnp.int64),
                jnp.asarray(start + offset, jnp.int64),
                n_simulations=min(chunk_size, n_simulations),
                n_particles=n_particles,
                frames=frames,
                params=params,
                unroll=unroll,
            )
            x[offset : offset + size] = np.asarray(xs)[:size]
            v[offset : offset + size] = np.asarray(vs)[:size]
            charges[offset : offset + size] = np.asarray(qs)[:size]
            bar.update(size)
    logger.info(
        "simulated %d %s trajectories of N=%d in %.1f s",
        n_simulations,
        split,
        n_particles,
        time.perf_counter() - begin,
    )
    return x, v, charges
