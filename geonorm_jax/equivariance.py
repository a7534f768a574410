"""Equivariance checks and the rotation/translation error (RTE) metrics of a model.

``apply_fn(params, graph) -> [n_node_total, 3]`` is any position model over
the batch layout of :mod:`geonorm_jax.graphs`, e.g. ``EGNN(...).apply``.
Each system of a batch gets its own transform, so a model that leaks
information between systems fails these checks too.

Translations have a fixed length, ``translation_scale``, in a uniform
direction. The default of 5 length units is the half-width of the box that
contains the data's initial positions, about the size of the systems
themselves (mean ``|x|`` is 2.6 to 4.6 at the input frame). A
translation-equivariant model shows only float rounding at that shift,
while a model that depends on absolute positions shows an order-one error.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import jraph
import numpy as np

from geonorm_jax import geometry, graphs

ApplyFn = Callable[[Any, jraph.GraphsTuple], jax.Array]

DEFAULT_TRANSLATION_SCALE = 5.0


def _draw_transforms(key, num_graphs, dtype, translation_scale):
    """Draw one rotation, reflection and translation per graph: ``[G, 3, 3]``, ``[G, 3, 3]``, ``[G, 3]``."""
    rotation_key, reflection_key, translation_key = jax.random.split(key, 3)
    rotations = jax.vmap(functools.partial(geometry.random_rotation, dtype=dtype))(
        jax.random.split(rotation_key, num_graphs)
    )
    reflections = jax.vmap(functools.partial(geometry.random_reflection, dtype=dtype))(
        jax.random.split(reflection_key, num_graphs)
    )
    translations = jax.vmap(
        functools.partial(geometry.random_translation, scale=translation_scale, dtype=dtype)
    )(jax.random.split(translation_key, num_graphs))
    return rotations, reflections, translations


def _transform_nodes(values, index, rotation, translation):
    """Apply each node's graph transform to ``values [n_node_total, 3]``."""
    moved = jnp.einsum("nij,nj->ni", rotation[index.node_graph], values)  # [n_node_total, 3]
    return moved + translation[index.node_graph]


def _node_errors(apply_fn, params, graph, base_output, rotation, translation):
    """Return ``|f(Rx + t, Rv) - (R f(x, v) + t)|`` and ``|f(Rx + t, Rv)|`` per node, both ``[n_node_total]``."""
    index = geometry.system_index(graph)
    moved_output = apply_fn(params, geometry.transform_graph(graph, rotation, translation))
    expected = _transform_nodes(base_output, index, rotation, translation)
    return geometry.safe_norm(moved_output - expected), geometry.safe_norm(moved_output)


@functools.partial(jax.jit, static_argnames=("apply_fn", "num_draws", "translation_scale"))
def _equivariance_errors(apply_fn, params, graph, key, num_draws, translation_scale):
    dtype = graph.nodes["x"].dtype
    num_graphs = graph.n_node.shape[0]
    rotations, reflections, translations = jax.vmap(
        lambda k: _draw_transforms(k, num_graphs, dtype, translation_scale)
    )(jax.random.split(key, num_draws))  # [K, G, 3, 3], [K, G, 3, 3], [K, G, 3]
    identity = jnp.broadcast_to(jnp.eye(3, dtype=dtype), rotations.shape)
    no_shift = jnp.zeros_like(translations)

    kinds = ("rotation", "translation", "reflection", "rigid")
    # One vmap over all kinds keeps a single copy of the model in the compiled program.
    all_rotations = jnp.concatenate([rotations, identity, reflections, rotations])  # [4K, G, 3, 3]
    all_translations = jnp.concatenate([no_shift, translations, no_shift, translations])  # [4K, G, 3]

    base_output = apply_fn(params, graph)
    node_errors = jax.vmap(functools.partial(_node_errors, apply_fn, params, graph, base_output))
    mask = graphs.node_mask(graph)  # [n_node_total]
    errors, moved_norms = node_errors(all_rotations, all_translations)  # [4K, n_node_total] each
    errors = jnp.where(mask, errors, 0.0).reshape(len(kinds), num_draws, -1)  # [kind, K, n_node_total]
    count = jnp.maximum(mask.sum(), 1) * num_draws

    results = {}
    for kind, kind_errors in zip(kinds, errors):
        results[f"{kind}_max"] = kind_errors.max()
        results[f"{kind}_mean"] = kind_errors.sum() / count
    base_norms = geometry.safe_norm(base_output)  # [n_node_total]
    results["output_scale"] = jnp.where(mask, jnp.maximum(base_norms, moved_norms.max(axis=0)), 0.0).max()
    return results


def equivariance_error(
    apply_fn: ApplyFn,
    params,
    graph: jraph.GraphsTuple,
    key: jax.Array,
    num_draws: int = 16,
    translation_scale: float = DEFAULT_TRANSLATION_SCALE,
) -> dict[str, float]:
    """Measure how far ``apply_fn`` is from E(3)-equivariance on one batch.

    Draws ``num_draws`` transforms at once (vmapped), each with its own
    rotation, reflection and translation per system, and compares
    ``f(Q x + t, Q v)`` with ``Q f(x, v) + t`` on the real nodes.

    Args:
      apply_fn: ``(params, graph) -> [n_node_total, 3]``; must be hashable
        (a Flax ``Module.apply`` is) because it is a static jit argument.
      params: the model's parameters.
      graph: a batch from :func:`geonorm_jax.graphs.build_graphs`.
      key: a ``jax.random`` key.
      num_draws: transforms per kind.
      translation_scale: length of each translation (see module docstring).

    Returns:
      Floats keyed ``{kind}_max`` and ``{kind}_mean`` for kind in
      ``rotation`` (proper, no shift), ``translation``, ``reflection``
      (det -1, no shift) and ``rigid`` (rotation and translation together):
      the max and mean over draws and real nodes of the Euclidean error per
      node. ``output_scale`` is the largest output length ``|f_i|`` over
      real nodes, of the original and all transformed inputs, for relative
      errors: float rounding grows with it, translations included. Jitted once per ``apply_fn``, shape and
      ``num_draws``.
    """
    results = _equivariance_errors(apply_fn, params, graph, key, num_draws, float(translation_scale))
    return {name: float(value) for name, value in results.items()}


@functools.partial(jax.jit, static_argnames=("apply_fn", "translation_scale"))
def _rte_batch(apply_fn, params, graph, key, translation_scale):
    """Per-graph MSEs ``[n_graph]`` (untransformed, rotated, translated) and the batch's max rigid error."""
    dtype = graph.nodes["x"].dtype
    num_graphs = graph.n_node.shape[0]
    rotation, _, translation = _draw_transforms(key, num_graphs, dtype, translation_scale)
    identity = jnp.broadcast_to(jnp.eye(3, dtype=dtype), rotation.shape)
    no_shift = jnp.zeros_like(translation)
    target = graph.nodes["target"]

    def per_graph_mse(rotation, translation):
        moved = geometry.transform_graph(graph, rotation, translation)
        return graphs.per_graph_mse(apply_fn(params, moved), moved.nodes["target"], graph)

    base_output = apply_fn(params, graph)
    untransformed = graphs.per_graph_mse(base_output, target, graph)
    rigid_errors, _ = _node_errors(apply_fn, params, graph, base_output, rotation, translation)  # [n_node_total]
    rigid_max = jnp.where(graphs.node_mask(graph), rigid_errors, 0.0).max()
    return untransformed, per_graph_mse(rotation, no_shift), per_graph_mse(identity, translation), rigid_max


def _summary(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "median": float(np.median(values)), "max": float(np.max(values))}


def rte_metrics(
    apply_fn: ApplyFn,
    params,
    graphs_iterable: Iterable[jraph.GraphsTuple],
    key: jax.Array,
    translation_scale: float = DEFAULT_TRANSLATION_SCALE,
) -> dict[str, Any]:
    """Compute the rotation/translation error (RTE) table of a model over a test set.

    Every test system gets one random rotation ``R`` and, separately, one
    random translation ``t``. The per-system MSEs are those of
    ``f(R x, R v)`` against ``R y`` and of ``f(x + t, v)`` against ``y + t``.

    Args:
      apply_fn: ``(params, graph) -> [n_node_total, 3]``, hashable.
      params: the model's parameters.
      graphs_iterable: batches with ``nodes["target"]``, e.g. the test set.
      key: a ``jax.random`` key; batch ``k`` uses ``fold_in(key, k)``.
      translation_scale: length of each translation (see module docstring).

    Returns:
      ``{"untransformed": S, "rotation": S, "translation": S,
      "equivariance_max": float, "num_samples": int}`` where each ``S`` is
      ``{"mean", "median", "max"}`` of the per-system MSE, and the rotation
      and translation entries add ``"delta"`` = their mean minus the
      untransformed mean. ``equivariance_max`` is the largest
      ``|f(R x + t, R v) - (R f(x, v) + t)|`` over all real particles.
      Not jit-able itself (loops over batches on the host); each batch
      shape is compiled once.

    Raises:
      ValueError: when the iterable yields no real system.
    """
    collected = {"untransformed": [], "rotation": [], "translation": []}
    rigid_max = 0.0
    for batch_index, graph in enumerate(graphs_iterable):
        batch_key = jax.random.fold_in(key, batch_index)
        *mses, batch_rigid_max = _rte_batch(apply_fn, params, graph, batch_key, float(translation_scale))
        real = np.asarray(graphs.graph_mask(graph))
        for name, values in zip(collected, mses):
            collected[name].append(np.asarray(values)[real])
        rigid_max = max(rigid_max, float(batch_rigid_max))

    arrays = {name: np.concatenate(values) if values else np.zeros(0) for name, values in collected.items()}
    if arrays["untransformed"].size == 0:
        raise ValueError("rte_metrics got no real systems; pass a non-empty iterable of batches")
    results: dict[str, Any] = {"untransformed": _summary(arrays["untransformed"])}
    for name in ("rotation", "translation"):
        summary = _summary(arrays[name])
        summary["delta"] = summary["mean"] - results["untransformed"]["mean"]
        results[name] = summary
    results["equivariance_max"] = rigid_max
    results["num_samples"] = int(arrays["untransformed"].size)
    return results
