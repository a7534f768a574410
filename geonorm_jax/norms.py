"""Normalization layers on particle coordinates: LayerNorm, ScaleNorm, GeoNorm.

Each layer acts on one system's positions ``x [N, 3]``; systems in a batch
never share statistics. Every layer exists three ways:

* a pure dense function over ``[N, 3]`` or ``[B, N, 3]`` (vmap-able),
* a segment form over the node-to-graph index of a padded jraph batch
  (``x [n_node_total, 3]`` with a :class:`geonorm_jax.geometry.SystemIndex`),
* a Linen module that owns the parameters and calls either form.

The learnable scale ``g_i`` and bias ``b_i`` come in three modes:

* ``"particle"``: one ``g_i``, ``b_i`` per particle index ``i``, as in Meng
  et al. (2023), "Towards Geometric Normalization Techniques in SE(3)
  Equivariant Graph Neural Networks". Ties the layer to a fixed ``N`` and
  particle order.
* ``"shared"``: one ``g``, ``b`` for all particles. Permutation-equivariant
  and valid for any ``N``.
* ``"adaptive"``: ``[g_i, b_i] = h_i W + c`` from the invariant node features
  ``h_i``. Permutation-equivariant and valid for any ``N``; SE(3)-equivariance
  is kept because ``h_i`` is invariant.

Parameters start at ``g = 1`` and ``b = 0`` in every mode. The adaptive mode
gets this with ``W = 0`` and ``c = [1, 0]``.

Parameter pytrees: ``{"g": [N], "b": [N]}`` (particle), ``{"g": [], "b": []}``
(shared), ``{"kernel": [F, 2], "bias": [2]}`` (adaptive). LayerNorm's bias
is a 3-vector, so its ``b`` gains a trailing axis of 3 and its adaptive
kernel has 4 columns. ScaleNorm has no bias: no ``b``, and 1 column.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from geonorm_jax import geometry

MODES = ("particle", "shared", "adaptive")
SIGMAS = ("particle", "system")
SCALENORM_KINDS = ("l2", "rms")

DEFAULT_EPS = 1e-6


# --- Parameters --------------------------------------------------------------


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"invalid {name} {value!r}; expected one of {choices}")


def init_affine(
    n_particles: int | None,
    mode: str = "particle",
    *,
    bias_dim: int = 0,
    use_bias: bool = True,
    num_features: int | None = None,
    dtype=jnp.float32,
) -> dict[str, jax.Array]:
    """Create the ``g``/``b`` parameters of a coordinate norm, at ``g = 1``, ``b = 0``.

    Args:
      n_particles: ``N``; required for ``mode="particle"``, ignored otherwise.
      mode: ``"particle"``, ``"shared"`` or ``"adaptive"`` (see module docstring).
      bias_dim: 0 for a scalar bias ``b_i`` (ScaleNorm, GeoNorm), 3 for a
        vector bias (LayerNorm).
      use_bias: False leaves ``b`` out (ScaleNorm has no bias).
      num_features: width ``F`` of the invariant features ``h``; required
        for ``mode="adaptive"``.
      dtype: parameter dtype.

    Returns:
      A dict of arrays, shapes listed in the module docstring.
    """
    _check_choice("mode", mode, MODES)
    bias_shape = (bias_dim,) if bias_dim else ()
    if mode == "particle":
        if n_particles is None:
            raise ValueError("mode='particle' needs n_particles; pass it or use mode='shared' or 'adaptive'")
        params = {"g": jnp.ones((n_particles,), dtype), "b": jnp.zeros((n_particles, *bias_shape), dtype)}
    elif mode == "shared":
        params = {"g": jnp.ones((), dtype), "b": jnp.zeros(bias_shape, dtype)}
    if mode != "adaptive":
        if not use_bias:
            del params["b"]
        return params

    if num_features is None:
        raise ValueError("mode='adaptive' needs num_features, the width of the invariant features h")
    columns = 1 + (max(bias_dim, 1) if use_bias else 0)
    return {
        "kernel": jnp.zeros((num_features, columns), dtype),
        "bias": jnp.zeros((columns,), dtype).at[0].set(1.0),
    }


def resolve_affine(
    params: dict[str, jax.Array],
    x: jax.Array,
    *,
    bias_dim: int = 0,
    h: jax.Array | None = None,
    particle_index: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Return ``g`` and ``b`` broadcast against positions ``x [..., N, 3]``.

    ``g`` comes back as ``[..., N, 1]`` (or a scalar ``[]`` in shared mode)
    and ``b`` as ``[..., N, 1]`` or ``[..., N, 3]`` (scalar or ``[3]``
    in shared mode), so ``g * vectors`` needs no further reshape. In the
    segment form ``x`` is ``[n_node_total, 3]`` and ``particle_index``
    selects each node's per-particle parameters. ``b`` is None for
    parameters without a bias. Jit-able.
    """
    if "kernel" in params:
        if h is None:
            raise ValueError("adaptive norm parameters need the invariant features h")
        affine = h @ params["kernel"] + params["bias"]  # [..., N, 1 + bias columns]
        g = affine[..., :1]
        b = affine[..., 1:] if affine.shape[-1] > 1 else None
        return g, b

    g, b = params["g"], params.get("b")
    if g.ndim == 0:
        return g, b
    if particle_index is not None:
        # Clip so that padding nodes beyond N read a valid (ignored) entry.
        g = jnp.take(g, particle_index, axis=0, mode="clip")
        if b is not None:
            b = jnp.take(b, particle_index, axis=0, mode="clip")
    elif g.shape[0] != x.shape[-2]:
        raise ValueError(
            f"per-particle parameters were made for N={g.shape[0]} particles but the input has "
            f"N={x.shape[-2]}; re-initialize with n_particles={x.shape[-2]} or use mode='shared' or 'adaptive'"
        )
    g = g[..., None]
    if b is not None and not bias_dim:
        b = b[..., None]
    return g, b


def _safe_sqrt(squared: jax.Array) -> jax.Array:
    """Square root that is 0 in value and gradient at 0 (double ``where``)."""
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """Divide, giving 0 in value and gradient wherever the denominator is 0."""
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


# --- LayerNorm on coordinates ------------------------------------------------


def coordinate_layernorm(x: jax.Array, g: jax.Array, b: jax.Array, *, eps: float = DEFAULT_EPS) -> jax.Array:
    """Apply LayerNorm to each particle's 3 coordinates (Meng et al. 2023, Eq. 3).

    ``F(x_i) = g_i (x_i - m_i) / s_i + b_i`` with ``m_i`` the mean and
    ``s_i = sqrt(var_i + eps)`` the standard deviation of the 3 numbers
    ``x_i1, x_i2, x_i3``. Neither rotation- nor translation-equivariant:
    a baseline only.

    Args:
      x: positions ``[..., 3]`` (any leading shape, e.g. ``[N, 3]``,
        ``[B, N, 3]`` or ``[n_node_total, 3]``).
      g: scale, broadcastable to ``x`` (``[..., 1]`` per particle or ``[]``).
      b: bias 3-vectors, broadcastable to ``x``.
      eps: added to the variance inside the square root; keeps value and
        gradient finite when the 3 coordinates are equal.

    Returns:
      ``x``'s shape and dtype. Jit-able and vmap-able.
    """
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centered = x - mean
    std = geometry.safe_norm(centered, keepdims=True, eps=3.0 * eps) / jnp.sqrt(3.0).astype(x.dtype)
    return g * _safe_divide(centered, std) + b


# --- ScaleNorm ----------------------------------------------------------------


def scalenorm(x: jax.Array, g: jax.Array, *, kind: str = "l2", eps: float = DEFAULT_EPS) -> jax.Array:
    """Scale each particle's position to length ``g_i`` (Meng et al. 2023, Eq. 4).

    ``F(x_i) = g_i x_i / norm(x_i)`` with ``norm`` the L2 norm
    ``sqrt(|x_i|**2 + eps)`` or the RMS norm ``sqrt(|x_i|**2 / 3 + eps)``.
    Rotation-equivariant about the origin, not translation-equivariant.

    Args:
      x: positions ``[..., 3]``.
      g: scale, broadcastable to ``x``.
      kind: ``"l2"`` or ``"rms"``.
      eps: added inside the square root; 0 gives the exact norm and an
        output of 0 (value and gradient) at the origin.

    Returns:
      ``x``'s shape and dtype. Jit-able and vmap-able.
    """
    _check_choice("ScaleNorm kind", kind, SCALENORM_KINDS)
    squared = jnp.sum(x * x, axis=-1, keepdims=True)
    if kind == "rms":
        squared = squared / 3.0
    return g * _safe_divide(x, _safe_sqrt(squared + eps))


# --- GeoNorm ------------------------------------------------------------------


def _geonorm_from_statistics(x, mu, mu0, squared_spread, g, b, eps, sigma):
    """Combine per-node statistics into GeoNorm's output.

    ``mu`` and ``mu0`` broadcast against ``x``. ``squared_spread`` is the
    per-system mean of ``|x_i - mu|**2`` (used for ``sigma="system"``).
    """
    centered = x - mu
    if sigma == "particle":
        scale = geometry.safe_norm(centered, keepdims=True, eps=eps)
    else:
        scale = _safe_sqrt(squared_spread + eps)

    # NOTE: eps also enters the direction's norm, so the direction has length
    # |mu - mu0| / sqrt(|mu - mu0|**2 + eps) instead of 1. Without eps, the unit
    # vector of a drift of a few float32 ulp is rounding noise of full length.
    # With eps, such drifts give a direction near 0. eps=0 restores the exact
    # unit direction, and a drift of exactly 0 then gives 0.
    direction = geometry.safe_normalize(mu - mu0, eps=eps)
    return g * _safe_divide(centered, scale) + b * direction + mu0


def geonorm(
    x: jax.Array,
    mu0: jax.Array,
    g: jax.Array,
    b: jax.Array,
    *,
    eps: float = DEFAULT_EPS,
    sigma: str = "particle",
) -> jax.Array:
    """Apply GeoNorm to dense systems (Meng et al. 2023, Eq. 5).

    ``F(x_i) = g_i (x_i - mu) / sigma_i + b_i (mu - mu0) / |mu - mu0| + mu0``
    with ``mu`` the system's centroid and ``mu0`` the centroid of the
    network's input positions. ``sigma="particle"`` uses
    ``sigma_i = sqrt(|x_i - mu|**2 + eps)`` (the paper), which puts every
    particle on a sphere of radius ``|g_i|``. ``sigma="system"`` uses one
    ``sigma = sqrt(mean_i |x_i - mu|**2 + eps)`` per system, which keeps the
    system's shape.

    SE(3)- and E(3)-equivariant: ``F(R x + t; R mu0 + t) = R F(x; mu0) + t``.
    Value and gradient are finite for ``mu == mu0`` (the direction term is 0
    then), for a particle on the centroid, for coincident particles and for
    ``N = 1``. In float32, ``(mu - mu0) / |mu - mu0|`` is rounding noise when
    the drift is a few ulp of the coordinates; ``eps`` damps drifts below
    about ``sqrt(eps)``.

    Args:
      x: positions ``[N, 3]`` or ``[B, N, 3]``.
      mu0: input centroid ``[3]`` or ``[B, 3]``.
      g, b: scale and scalar bias, broadcastable to ``[..., N, 1]``.
      eps: constant inside the square roots of ``sigma`` and of the
        direction's norm, in squared length units.
      sigma: ``"particle"`` or ``"system"``.

    Returns:
      ``x``'s shape and dtype. Jit-able and vmap-able.
    """
    _check_choice("sigma", sigma, SIGMAS)
    mu = jnp.mean(x, axis=-2, keepdims=True)  # [..., 1, 3]
    squared_spread = jnp.mean(jnp.sum((x - mu) ** 2, axis=-1, keepdims=True), axis=-2, keepdims=True)
    return _geonorm_from_statistics(x, mu, mu0[..., None, :], squared_spread, g, b, eps, sigma)


def geonorm_segment(
    x: jax.Array,
    mu0: jax.Array,
    g: jax.Array,
    b: jax.Array,
    index: geometry.SystemIndex,
    *,
    eps: float = DEFAULT_EPS,
    sigma: str = "particle",
) -> jax.Array:
    """Apply GeoNorm to every system of a jraph batch; see :func:`geonorm`.

    Args:
      x: positions ``[n_node_total, 3]``.
      mu0: input centroids ``[n_graph, 3]``.
      g, b: ``[n_node_total, 1]`` or scalars.
      index: the batch's :class:`geonorm_jax.geometry.SystemIndex`.
      eps, sigma: as in :func:`geonorm`.

    Returns:
      ``[n_node_total, 3]``. Finite on padding graphs, including empty ones.
      Jit-able.
    """
    _check_choice("sigma", sigma, SIGMAS)
    mu = geometry.segment_centroid(x, index)[index.node_graph]  # [n_node_total, 3]
    squared_distance = jnp.sum((x - mu) ** 2, axis=-1, keepdims=True)  # [n_node_total, 1]
    squared_spread = geometry.segment_mean(squared_distance, index)[index.node_graph]  # [n_node_total, 1]
    return _geonorm_from_statistics(x, mu, mu0[index.node_graph], squared_spread, g, b, eps, sigma)


def geonorm_init(
    n_particles: int | None,
    mode: str = "particle",
    *,
    num_features: int | None = None,
    dtype=jnp.float32,
) -> dict[str, jax.Array]:
    """Create GeoNorm parameters at ``g = 1``, ``b = 0``.

    Args:
      n_particles: ``N``; required for ``mode="particle"``, ignored otherwise.
      mode: ``"particle"``, ``"shared"`` or ``"adaptive"``.
      num_features: width of ``h``; required for ``mode="adaptive"``.
      dtype: parameter dtype.

    Returns:
      ``{"g": [N], "b": [N]}``, ``{"g": [], "b": []}`` or
      ``{"kernel": [F, 2], "bias": [2]}``.
    """
    return init_affine(n_particles, mode, bias_dim=0, num_features=num_features, dtype=dtype)


def geonorm_apply(
    params: dict[str, jax.Array],
    x: jax.Array,
    mu0: jax.Array,
    *,
    h: jax.Array | None = None,
    eps: float = DEFAULT_EPS,
    sigma: str = "particle",
) -> jax.Array:
    """Apply GeoNorm with parameters from :func:`geonorm_init` to dense systems.

    Args:
      params: from :func:`geonorm_init`; the mode follows from its keys.
      x: positions ``[N, 3]`` or ``[B, N, 3]``.
      mu0: input centroid ``[3]`` or ``[B, 3]``.
      h: invariant features ``[N, F]`` or ``[B, N, F]``; adaptive mode only.
      eps, sigma: as in :func:`geonorm`.

    Returns:
      ``x``'s shape and dtype. Pure, jit-able and vmap-able (a batch
      ``[B, N, 3]`` gives the same result as vmapping over its systems).

    Raises:
      ValueError: per-particle parameters for another ``N``, or adaptive
        parameters without ``h``.
    """
    g, b = resolve_affine(params, x, h=h)
    return geonorm(x, mu0, g, b, eps=eps, sigma=sigma)


def geonorm_segment_apply(
    params: dict[str, jax.Array],
    x: jax.Array,
    mu0: jax.Array,
    index: geometry.SystemIndex,
    *,
    h: jax.Array | None = None,
    eps: float = DEFAULT_EPS,
    sigma: str = "particle",
) -> jax.Array:
    """Apply GeoNorm to a jraph batch: ``x [n_node_total, 3]``, ``mu0 [n_graph, 3]``.

    ``h`` is ``[n_node_total, F]`` in adaptive mode. Per-particle parameters
    are selected by ``index.particle_index``; the caller checks that every
    real graph has the ``N`` they were made for. Jit-able.
    """
    g, b = resolve_affine(params, x, h=h, particle_index=index.particle_index)
    return geonorm_segment(x, mu0, g, b, index, eps=eps, sigma=sigma)


# --- Linen modules ------------------------------------------------------------


class _AffineNorm(nn.Module):
    """Base class: creates ``g``/``b`` parameters with :func:`init_affine`'s shapes."""

    mode: str = "particle"
    num_particles: int | None = None
    eps: float = DEFAULT_EPS

    def affine(self, x, h, index, bias_dim, use_bias=True):
        _check_choice("mode", self.mode, MODES)
        dtype = x.dtype
        if self.mode == "adaptive":
            if h is None:
                raise ValueError("mode='adaptive' needs the invariant features h")
            initial = init_affine(
                None, "adaptive", bias_dim=bias_dim, use_bias=use_bias, num_features=h.shape[-1], dtype=dtype
            )
        else:
            n_particles = self.num_particles
            if self.mode == "particle" and n_particles is None:
                raise ValueError("mode='particle' needs num_particles; set it or use mode='shared' or 'adaptive'")
            initial = init_affine(n_particles, self.mode, bias_dim=bias_dim, use_bias=use_bias, dtype=dtype)
        params = {name: self.param(name, lambda _key, value=value: value) for name, value in initial.items()}
        particle_index = None if index is None else index.particle_index
        return resolve_affine(params, x, bias_dim=bias_dim, h=h, particle_index=particle_index)


class CoordinateLayerNorm(_AffineNorm):
    """LayerNorm over each particle's 3 coordinates; see :func:`coordinate_layernorm`.

    Call with ``x [..., N, 3]`` (dense) or ``x [n_node_total, 3]`` plus
    ``index`` (segment form); ``h`` only in adaptive mode. Jit-able.
    """

    @nn.compact
    def __call__(self, x, index: geometry.SystemIndex | None = None, *, h=None):
        g, b = self.affine(x, h, index, bias_dim=3)
        return coordinate_layernorm(x, g, b, eps=self.eps)


class ScaleNorm(_AffineNorm):
    """Scale every position to length ``g_i``; see :func:`scalenorm`.

    The layer has a scale ``g`` and no bias. Call like
    :class:`CoordinateLayerNorm`.
    """

    kind: str = "l2"

    @nn.compact
    def __call__(self, x, index: geometry.SystemIndex | None = None, *, h=None):
        g, _ = self.affine(x, h, index, bias_dim=0, use_bias=False)
        return scalenorm(x, g, kind=self.kind, eps=self.eps)


class GeoNorm(_AffineNorm):
    """GeoNorm layer; see :func:`geonorm`.

    Call with ``x [N, 3]`` or ``[B, N, 3]`` and ``mu0 [3]`` or ``[B, 3]``
    (dense), or with ``x [n_node_total, 3]``, ``mu0 [n_graph, 3]`` and
    ``index`` (segment form). ``h`` (``[..., F]`` per node) only in
    adaptive mode. Jit-able; the parameters match :func:`geonorm_init`.
    """

    sigma: str = "particle"

    @nn.compact
    def __call__(self, x, mu0, index: geometry.SystemIndex | None = None, *, h=None):
        g, b = self.affine(x, h, index, bias_dim=0)
        if index is None:
            return geonorm(x, mu0, g, b, eps=self.eps, sigma=self.sigma)
        return geonorm_segment(x, mu0, g, b, index, eps=self.eps, sigma=self.sigma)
