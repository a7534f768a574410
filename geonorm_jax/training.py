"""Jitted Optax training and evaluation steps for EGNN on padded graph batches.

The steps are pure functions of ``(params, opt_state, graph)``, so they can be
``jax.vmap``-ed over the parameter and optimizer-state pytrees to train several
seeds of one configuration in a single compiled step.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import jraph
import optax

from geonorm_jax import graphs
from geonorm_jax.config import TrainConfig
from geonorm_jax.egnn import EGNN

Params = Any


class StepMetrics(NamedTuple):
    """Per-step scalars: the batch MSE, the global gradient norm, the real systems."""

    loss: jax.Array
    grad_norm: jax.Array
    num_graphs: jax.Array


def build_model(config: TrainConfig) -> EGNN:
    """Return the EGNN that ``config`` describes."""
    return EGNN(
        num_layers=config.num_layers,
        hidden_dim=config.hidden_dim,
        norm=config.norm,
        norm_mode=config.norm_mode,
        sigma=config.sigma,
        scalenorm_kind=config.scalenorm_kind,
        norm_placement=config.norm_placement,
        norm_diff=config.norm_diff,
        coords_tanh=config.coords_tanh,
        h_layernorm=config.h_layernorm,
        num_particles=config.n_particles,
    )


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Adam with ``weight_decay * params`` added to the gradient before the moments.

    This is torch.optim.Adam's ``weight_decay`` (L2 regularization), not
    AdamW's decoupled decay.
    """
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.adam(config.learning_rate),
    )


def init_params(model: EGNN, graph: jraph.GraphsTuple, key: jax.Array) -> Params:
    """Initialize the model's parameters from one example batch."""
    return model.init(key, graph)


def batch_loss(model: EGNN, params: Params, graph: jraph.GraphsTuple) -> jax.Array:
    """MSE of the predicted positions over the real particles of a batch."""
    prediction = model.apply(params, graph)
    return graphs.masked_mse(prediction, graph.nodes["target"], graph)


def make_train_step(
    model: EGNN, optimizer: optax.GradientTransformation
) -> Callable[[Params, optax.OptState, jraph.GraphsTuple], tuple[Params, optax.OptState, StepMetrics]]:
    """Return the un-jitted training step ``(params, opt_state, graph) -> (params, opt_state, metrics)``.

    Callers jit it (and may vmap it over seeds first). Parameters and
    optimizer state are donated by :func:`jit_train_step`.
    """

    def train_step(params, opt_state, graph):
        loss, grads = jax.value_and_grad(lambda p: batch_loss(model, p, graph))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        num_graphs = graphs.graph_mask(graph).sum()
        return params, opt_state, StepMetrics(loss, optax.tree.norm(grads), num_graphs)

    return train_step


def jit_train_step(step: Callable) -> Callable:
    """Jit a training step, donating the parameter and optimizer-state buffers."""
    return jax.jit(step, donate_argnums=(0, 1))


def make_eval_step(model: EGNN) -> Callable[[Params, jraph.GraphsTuple], tuple[jax.Array, jax.Array]]:
    """Return the jitted ``(params, graph) -> (batch MSE, number of real systems)``."""

    @jax.jit
    def eval_step(params, graph):
        return batch_loss(model, params, graph), graphs.graph_mask(graph).sum()

    return eval_step


def evaluate(eval_step: Callable, params: Params, batches: Iterable[jraph.GraphsTuple]) -> float:
    """Return the MSE over every real system of ``batches``.

    Batch MSEs are weighted by their number of real systems, which equals
    weighting by particles because every system of a dataset has N particles.
    """
    total = jnp.zeros(())
    count = jnp.zeros(())
    for graph in batches:
        loss, num_graphs = eval_step(params, graph)
        total = total + loss * num_graphs
        count = count + num_graphs
    return float(total / jnp.maximum(count, 1))
