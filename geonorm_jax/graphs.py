"""Fully connected particle systems as padded jraph ``GraphsTuple`` batches.

Every batch the library builds has the same layout, which the model relies on:

* ``B`` real graphs first, each a system of ``N`` particles whose nodes are
  contiguous (graph ``g`` owns nodes ``g*N .. g*N + N - 1``).
* Directed edges in receiver-major order: for graph ``g`` and receiver ``i``
  ascending, one edge from every sender ``j != i``, ``j`` ascending. Graph
  ``g`` owns edges ``g*N*(N-1) .. (g+1)*N*(N-1) - 1``, so per-edge arrays of
  the real graphs reshape to ``[B, N, N-1, ...]``. There are no self-edges
  and no edges between systems.
* Padding from ``jraph.pad_with_graphs`` after the real graphs, always at
  least one padding graph (``jraph.get_graph_padding_mask`` treats the last
  graph as padding). Padding nodes hold zeros and padding edges are
  self-loops on the first padding node, so every norm the model takes must be
  finite at the zero vector.

Node features (``graph.nodes``, a dict of ``[n_node_total, ...]`` arrays):
``x`` positions ``[n, 3]``, ``v`` velocities ``[n, 3]``, ``h`` speeds
``|v|`` ``[n, 1]`` (the invariant input features), ``charge`` ``[n, 1]``
(+1 or -1) and, for training data, ``target`` positions ``[n, 3]``.
Edge features (``graph.edges``): ``charge_product`` ``q_i q_j`` ``[e, 1]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import jraph
import numpy as np


@functools.lru_cache(maxsize=32)
def fully_connected_edges(n_graphs: int, n_particles: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(senders, receivers)`` of ``n_graphs`` fully connected systems.

    Both are int32 arrays of shape ``[n_graphs * N * (N - 1)]`` in the
    receiver-major order described in the module docstring. Host-side numpy;
    cached because every batch of one shape shares them. Treat as read-only.
    """
    receivers_one, senders_one = np.nonzero(~np.eye(n_particles, dtype=bool))
    offsets = np.arange(n_graphs, dtype=np.int64)[:, None] * n_particles
    senders = (senders_one[None, :] + offsets).reshape(-1).astype(np.int32)
    receivers = (receivers_one[None, :] + offsets).reshape(-1).astype(np.int32)
    senders.flags.writeable = False
    receivers.flags.writeable = False
    return senders, receivers


def padding_budget(batch_size: int, n_particles: int) -> tuple[int, int, int]:
    """Return the static ``(n_node, n_edge, n_graph)`` of a padded batch.

    One node, one edge and one graph beyond ``batch_size`` full systems, so
    that a full batch still carries its padding graph.
    """
    n_node = batch_size * n_particles + 1
    n_edge = batch_size * n_particles * (n_particles - 1) + 1
    return n_node, n_edge, batch_size + 1


def build_graphs(
    x: np.ndarray,
    v: np.ndarray,
    charges: np.ndarray,
    target: np.ndarray | None = None,
    *,
    batch_size: int | None = None,
    dtype=np.float32,
) -> jraph.GraphsTuple:
    """Build a padded batch of fully connected systems from dense arrays.

    Args:
      x: positions ``[S, N, 3]``.
      v: velocities ``[S, N, 3]``.
      charges: charges ``[S, N]`` or ``[S, N, 1]``, values +1 or -1.
      target: optional target positions ``[S, N, 3]``, stored as
        ``nodes["target"]``.
      batch_size: the padding budget in systems (``S`` if None). Batches of
        fewer systems are padded to it, so that a jitted function compiles for one
        shape.
      dtype: floating dtype of the node and edge features.

    Returns:
      A ``GraphsTuple`` with the layout of the module docstring and
      ``batch_size + 1`` graphs. Host-side numpy; not jit-able.

    Raises:
      ValueError: on inconsistent shapes, ``N < 2``, more systems than
        ``batch_size``, or non-finite values.
    """
    x = np.asarray(x)
    v = np.asarray(v)
    charges = np.asarray(charges)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"positions must have shape [S, N, 3], got {x.shape}")
    n_systems, n_particles, _ = x.shape
    if v.shape != x.shape:
        raise ValueError(f"velocities must have the shape of positions {x.shape}, got {v.shape}")
    if charges.shape == (n_systems, n_particles, 1):
        charges = charges[..., 0]
    if charges.shape != (n_systems, n_particles):
        raise ValueError(
            f"charges must have shape [S, N] = {(n_systems, n_particles)}, got {charges.shape}"
        )
    if target is not None and np.shape(target) != x.shape:
        raise ValueError(f"targets must have the shape of positions {x.shape}, got {np.shape(target)}")
    if n_particles < 2:
        raise ValueError(f"a system needs at least 2 particles to have edges, got N={n_particles}")
    if batch_size is None:
        batch_size = n_systems
    if not 1 <= n_systems <= batch_size:
        raise ValueError(f"got {n_systems} systems for a padding budget of batch_size={batch_size}")
    for name, array in (("positions", x), ("velocities", v), ("charges", charges), ("targets", target)):
        if array is not None and not np.all(np.isfinite(array)):
            raise ValueError(f"{name} contain NaN or Inf; regenerate or clean the data")

    senders, receivers = fully_connected_edges(n_systems, n_particles)
    q = charges.reshape(-1, 1).astype(dtype)
    nodes = {
        "x": x.reshape(-1, 3).astype(dtype),
        "v": v.reshape(-1, 3).astype(dtype),
        "h": np.linalg.norm(v, axis=-1).reshape(-1, 1).astype(dtype),
        "charge": q,
    }
    if target is not None:
        nodes["target"] = np.asarray(target).reshape(-1, 3).astype(dtype)
    n_edge_one = n_particles * (n_particles - 1)
    graph = jraph.GraphsTuple(
        nodes=nodes,
        edges={"charge_product": q[receivers] * q[senders]},
        senders=senders,
        receivers=receivers,
        n_node=np.full(n_systems, n_particles, dtype=np.int32),
        n_edge=np.full(n_systems, n_edge_one, dtype=np.int32),
        globals=None,
    )
    n_node, n_edge, n_graph = padding_budget(batch_size, n_particles)
    return jraph.pad_with_graphs(graph, n_node=n_node, n_edge=n_edge, n_graph=n_graph)


def dense_shape(graph: jraph.GraphsTuple) -> tuple[int, int] | None:
    """Return ``(B, N)`` if the static shapes match the padded layout, else None.

    Reads only static shapes, so it is usable under ``jit``. A match means
    that the first ``B * N`` nodes and ``B * N * (N - 1)`` edges can be
    reshaped to per-system arrays. Shapes alone cannot prove that the real
    graphs have equal sizes, so the caller must pass a batch from
    :func:`build_graphs`.
    """
    n_graph = graph.n_node.shape[0]
    n_node_total = jax.tree_util.tree_leaves(graph.nodes)[0].shape[0]
    n_edge_total = graph.senders.shape[0]
    batch_size = n_graph - 1
    if batch_size < 1 or (n_node_total - 1) % batch_size:
        return None
    n_particles = (n_node_total - 1) // batch_size
    if n_particles < 2 or padding_budget(batch_size, n_particles) != (n_node_total, n_edge_total, n_graph):
        return None
    return batch_size, n_particles


def node_mask(graph: jraph.GraphsTuple) -> jax.Array:
    """Return a bool ``[n_node_total]`` mask, True on nodes of real graphs. Jit-able."""
    return jraph.get_node_padding_mask(_with_jax_counts(graph))


def graph_mask(graph: jraph.GraphsTuple) -> jax.Array:
    """Return a bool ``[n_graph]`` mask, True on real graphs. Jit-able."""
    return jraph.get_graph_padding_mask(_with_jax_counts(graph))


def _with_jax_counts(graph: jraph.GraphsTuple) -> jraph.GraphsTuple:
    # jraph indexes n_node with traced values; on a numpy n_node captured as a
    # jit constant that raises TracerArrayConversionError.
    return graph._replace(n_node=jnp.asarray(graph.n_node), n_edge=jnp.asarray(graph.n_edge))


def per_graph_mse(prediction: jax.Array, target: jax.Array, graph: jraph.GraphsTuple) -> jax.Array:
    """Compute each system's mean squared error over its particles and 3 coordinates.

    Args:
      prediction, target: ``[n_node_total, 3]``.
      graph: the batch, for ``n_node`` and the padding layout.

    Returns:
      ``[n_graph]`` MSE per graph; 0 on padding graphs (never NaN, even for
      empty ones). Jit-able.
    """
    n_graph = graph.n_node.shape[0]
    n_node_total = prediction.shape[0]
    node_graph = jnp.repeat(jnp.arange(n_graph), graph.n_node, total_repeat_length=n_node_total)
    squared_error = jnp.where(node_mask(graph)[:, None], (prediction - target) ** 2, 0.0)
    sums = jax.ops.segment_sum(squared_error.sum(axis=-1), node_graph, num_segments=n_graph)
    counts = 3 * jnp.maximum(graph.n_node, 1)
    return jnp.where(graph_mask(graph), sums / counts, 0.0)


def masked_mse(prediction: jax.Array, target: jax.Array, graph: jraph.GraphsTuple) -> jax.Array:
    """Compute the MSE over all real particles and coordinates of a batch.

    The sum of squared errors over real nodes is divided by
    ``3 * n_real_nodes``, so padding never changes the value. It equals the
    MSE of the same systems unpadded. Jit-able.
    """
    mask = node_mask(graph)
    squared_error = jnp.where(mask[:, None], (prediction - target) ** 2, 0.0)
    return squared_error.sum() / (3.0 * jnp.maximum(mask.sum(), 1))
