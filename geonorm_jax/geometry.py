"""Rigid transforms, NaN-safe norms and per-system centroids.

Conventions: points are row vectors, so a rotation ``R`` acts on positions
``x [..., 3]`` as ``x @ R.T`` and a translation ``t [3]`` adds to them.
Velocities are displacements per unit time: they rotate and reflect with the
positions but never translate.

Every function here is pure, jit-able and vmap-able unless its docstring
states otherwise. To draw many transforms at once, vmap over split keys::

    rotations = jax.vmap(random_rotation)(jax.random.split(key, 64))  # [64, 3, 3]
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jraph


# --- Random transforms -------------------------------------------------------


def random_rotation(key: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Draw a proper rotation ``[3, 3]`` (det +1) uniformly from SO(3).

    A standard Gaussian 4-vector, normalized, is a uniform unit quaternion,
    and the rotation matrix of a uniform unit quaternion is Haar-distributed
    on SO(3). Unlike a QR decomposition this needs no LAPACK call, so it
    compiles fast under vmap.

    Args:
      key: a ``jax.random`` key.
      dtype: floating dtype of the result.

    Returns:
      ``[3, 3]`` array of ``dtype``. Jit-able and vmap-able over ``key``.
    """
    quaternion = jax.random.normal(key, (4,), dtype=dtype)
    w, x, y, z = safe_normalize(quaternion)
    return jnp.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ],
        dtype=dtype,
    )


def random_reflection(key: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Draw an improper orthogonal matrix ``[3, 3]`` (det -1) uniformly from O(3) \\ SO(3).

    The matrix is ``-R`` with ``R`` a uniform rotation, which is a uniform
    draw from the improper component. It is a reflection through a random
    plane composed with a random rotation. Jit-able and vmap-able over ``key``.
    """
    return -random_rotation(key, dtype)


def random_translation(key: jax.Array, scale: float = 1.0, dtype=jnp.float32) -> jax.Array:
    """Draw a translation ``[3]`` of length exactly ``scale`` in a uniform direction.

    A fixed length, instead of a Gaussian, keeps equivariance errors
    comparable between draws, because float32 cancellation error grows with
    the size of the shift. Jit-able and vmap-able over ``key``.
    """
    direction = jax.random.normal(key, (3,), dtype=dtype)
    return scale * safe_normalize(direction)


def transform_positions(x: jax.Array, rotation: jax.Array, translation: jax.Array | None = None) -> jax.Array:
    """Apply ``x -> R x + t`` to positions.

    Args:
      x: positions ``[..., 3]``.
      rotation: orthogonal ``[3, 3]`` (proper or improper).
      translation: ``[3]`` or broadcastable to ``x``; None for no shift.

    Returns:
      Positions of ``x``'s shape. Jit-able and vmap-able.
    """
    moved = x @ rotation.T
    if translation is not None:
        moved = moved + translation
    return moved


def transform_velocities(v: jax.Array, rotation: jax.Array) -> jax.Array:
    """Apply ``v -> R v`` to velocities ``[..., 3]``; velocities never translate."""
    return v @ rotation.T


def transform_graph(graph: jraph.GraphsTuple, rotation: jax.Array, translation: jax.Array) -> jraph.GraphsTuple:
    """Move every system of a batch by its own rigid transform.

    Args:
      graph: a batch with ``nodes["x"]``, ``nodes["v"]`` and optionally
        ``nodes["target"]``, all ``[n_node_total, 3]``.
      rotation: ``[n_graph, 3, 3]``, one orthogonal matrix per graph.
      translation: ``[n_graph, 3]``, one shift per graph.

    Returns:
      The batch with ``x`` and ``target`` mapped to ``R x + t`` and ``v`` to
      ``R v``, each with its own graph's transform. ``h`` (speeds), charges
      and edges are invariant and stay. Jit-able and vmap-able over
      ``rotation`` and ``translation``.
    """
    index = system_index(graph)
    node_rotation = rotation[index.node_graph]  # [n_node_total, 3, 3]
    node_translation = translation[index.node_graph]  # [n_node_total, 3]

    def rotate(vectors):
        return jnp.einsum("nij,nj->ni", node_rotation, vectors)

    nodes = dict(graph.nodes)
    nodes["x"] = rotate(nodes["x"]) + node_translation
    nodes["v"] = rotate(nodes["v"])
    if "target" in nodes:
        nodes["target"] = rotate(nodes["target"]) + node_translation
    return graph._replace(nodes=nodes)


# --- NaN-safe norms ----------------------------------------------------------


def safe_norm(x: jax.Array, axis: int = -1, keepdims: bool = False, eps: float = 0.0) -> jax.Array:
    """Compute ``sqrt(sum(x**2) + eps)`` along ``axis``, finite in value and gradient at 0.

    With ``eps > 0`` the argument of the square root is never 0, so the function is smooth
    and its gradient at the zero vector is 0. With ``eps == 0`` it is the
    exact Euclidean norm, made safe by the double-``where`` trick: the
    square root is evaluated on 1 wherever the sum of squares is 0, and the
    result there is replaced by 0, so the gradient at the zero vector is 0
    instead of NaN.

    Args:
      x: ``[..., d, ...]`` floating array.
      axis: the vector axis.
      keepdims: keep ``axis`` with size 1.
      eps: non-negative constant added inside the square root, in squared
        units of ``x``.

    Returns:
      Norms of ``x``'s dtype, ``axis`` removed unless ``keepdims``.
      Jit-able and vmap-able.
    """
    squared = jnp.sum(x * x, axis=axis, keepdims=keepdims) + eps
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def safe_normalize(x: jax.Array, axis: int = -1, eps: float = 0.0) -> jax.Array:
    """Compute ``x / safe_norm(x, eps)`` along ``axis``; 0 (value and gradient) at the zero vector.

    With ``eps > 0`` the result has length ``|x| / sqrt(|x|**2 + eps)``,
    which is below 1 and goes to 0 smoothly for ``|x|`` below about
    ``sqrt(eps)``. With ``eps == 0`` it is a unit vector or exactly 0.
    Same shape as ``x``. Jit-able and vmap-able.
    """
    norm = safe_norm(x, axis=axis, keepdims=True, eps=eps)
    positive = norm > 0
    return jnp.where(positive, x / jnp.where(positive, norm, 1.0), 0.0)


# --- Per-system statistics over a GraphsTuple --------------------------------


class SystemIndex(NamedTuple):
    """Node-to-system bookkeeping of a ``GraphsTuple``, computed once per batch.

    Attributes:
      node_graph: int32 ``[n_node_total]``, the graph each node belongs to.
      particle_index: int32 ``[n_node_total]``, the node's position inside
        its graph (0 .. n_node[g] - 1).
      n_node: int32 ``[n_graph]``, nodes per graph (0 for empty padding graphs).
      num_graphs: static number of graphs ``n_graph``.
    """

    node_graph: jax.Array
    particle_index: jax.Array
    n_node: jax.Array
    num_graphs: int


def system_index(graph: jraph.GraphsTuple) -> SystemIndex:
    """Compute the :class:`SystemIndex` of a batch. Jit-able (shapes are static)."""
    num_graphs = graph.n_node.shape[0]
    n_node_total = jax.tree_util.tree_leaves(graph.nodes)[0].shape[0]
    n_node = jnp.asarray(graph.n_node, dtype=jnp.int32)
    node_graph = jnp.repeat(jnp.arange(num_graphs, dtype=jnp.int32), n_node, total_repeat_length=n_node_total)
    first_node = jnp.cumsum(n_node) - n_node  # [n_graph]
    particle_index = jnp.arange(n_node_total, dtype=jnp.int32) - first_node[node_graph]
    return SystemIndex(node_graph, particle_index, n_node, num_graphs)


def segment_mean(data: jax.Array, index: SystemIndex) -> jax.Array:
    """Average node values per graph: ``[n_node_total, ...] -> [n_graph, ...]``.

    Empty graphs get 0, never NaN. Jit-able.
    """
    sums = jax.ops.segment_sum(data, index.node_graph, num_segments=index.num_graphs)
    counts = jnp.maximum(index.n_node, 1).astype(data.dtype)
    return sums / counts.reshape((-1,) + (1,) * (data.ndim - 1))


def segment_centroid(x: jax.Array, index: SystemIndex) -> jax.Array:
    """Compute each system's centroid: positions ``[n_node_total, 3] -> [n_graph, 3]``.

    Equal masses, so the centroid is the center of mass. Empty padding
    graphs give 0, never NaN. Jit-able and vmap-able over ``x``.
    """
    return segment_mean(x, index)


def graph_centroid(x: jax.Array, graph: jraph.GraphsTuple) -> jax.Array:
    """Compute each system's centroid ``[n_graph, 3]`` of positions ``x [n_node_total, 3]``. Jit-able."""
    return segment_centroid(x, system_index(graph))
