"""EGNN, velocity variant (Satorras et al. 2021), with optional coordinate norms.

One layer, with ``i`` the receiver and ``j`` the sender of an edge::

    m_ij = phi_e([h_i, h_j, |x_i - x_j|**2, q_i q_j, |x0_i - x0_j|**2])
    x_i <- x_i + 1/(N-1) sum_j clip((x_i - x_j) phi_x(m_ij), -100, 100) + phi_v(h_i) v_i
    h_i <- h_i + phi_h([h_i, sum_j m_ij])

with ``h0 = Linear(1 -> H)(|v|)``, ``v`` the input velocity at every layer
and ``x0`` the input positions. The network returns the final positions.
Layer sizes, activations and initializers follow the reference PyTorch
code (vgsatorras/egnn, ``E_GCL_vel`` and ``EGNN_vel``): 4 layers of width
64 have 134,020 parameters.

The per-layer math reaches the graph only through a message-passing object
with four operations (gather at receivers, gather at senders, sum and mean
over incoming edges). :class:`SegmentMessagePassing` implements them with
jraph's edge lists; another layout (e.g. dense ``[B, N, N, H]`` edges) can
implement the same four operations without touching the layer.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph
import numpy as np

from geonorm_jax import geometry, graphs, norms

NORMS = ("none", "layernorm", "scalenorm", "geonorm")
PLACEMENTS = ("between", "every")
COORDINATE_CLIP = 100.0


# --- Initializers matching torch.nn.Linear --------------------------------------


def torch_linear_kernel_init() -> nn.initializers.Initializer:
    """Return torch ``nn.Linear``'s default weight init for a Flax ``[fan_in, fan_out]`` kernel.

    torch uses ``kaiming_uniform_(a=sqrt(5))``, i.e. ``U(-b, b)`` with
    ``b = sqrt(6 / ((1 + a**2) fan_in)) = 1 / sqrt(fan_in)``.
    """
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """Return torch ``nn.Linear``'s default bias init, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def xavier_uniform_init(gain: float = 1.0) -> nn.initializers.Initializer:
    """Return torch's ``xavier_uniform_(gain)``: ``U(-b, b)``, ``b = gain sqrt(6 / (fan_in + fan_out))``."""
    return nn.initializers.variance_scaling(gain**2, "fan_avg", "uniform")


class Linear(nn.Module):
    """Affine layer ``x W + c`` initialized like torch ``nn.Linear`` unless ``kernel_init`` is given.

    ``x [..., fan_in] -> [..., features]``. The parameter names ``kernel``
    and ``bias`` match ``flax.linen.Dense``.
    """

    features: int
    use_bias: bool = True
    kernel_init: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        kernel_init = self.kernel_init or torch_linear_kernel_init()
        kernel = self.param("kernel", kernel_init, (fan_in, self.features), self.param_dtype)
        y = x @ kernel
        if self.use_bias:
            y = y + self.param("bias", torch_linear_bias_init(fan_in), (self.features,), self.param_dtype)
        return y


# --- Message passing over a padded jraph batch ---------------------------------


class SegmentMessagePassing(NamedTuple):
    """Gathers and aggregations of a jraph edge list, shared by every layer.

    Attributes:
      senders, receivers: int32 ``[n_edge_total]``.
      num_nodes: static ``n_node_total``.
      inverse_neighbor_count: ``[n_node_total, 1]``, ``1 / (n_node - 1)`` of
        the node's graph (1 for graphs of fewer than 2 nodes).
    """

    senders: jax.Array
    receivers: jax.Array
    num_nodes: int
    inverse_neighbor_count: jax.Array

    @classmethod
    def from_graph(cls, graph: jraph.GraphsTuple, index: geometry.SystemIndex, dtype) -> "SegmentMessagePassing":
        # NOTE: the mean divides by N - 1 of the node's graph, which equals the
        # reference's count of incoming edges on fully connected graphs without
        # self-edges (the layout of geonorm_jax.graphs), and stays 1 on padding.
        neighbors = jnp.maximum(index.n_node - 1, 1).astype(dtype)[index.node_graph]  # [n_node_total]
        return cls(graph.senders, graph.receivers, index.node_graph.shape[0], (1.0 / neighbors)[:, None])

    def at_receivers(self, node_values: jax.Array) -> jax.Array:
        """``[n_node_total, ...] -> [n_edge_total, ...]``, the receiver's value per edge."""
        return node_values[self.receivers]

    def at_senders(self, node_values: jax.Array) -> jax.Array:
        """``[n_node_total, ...] -> [n_edge_total, ...]``, the sender's value per edge."""
        return node_values[self.senders]

    def sum_incoming(self, edge_values: jax.Array) -> jax.Array:
        """``[n_edge_total, ...] -> [n_node_total, ...]``, summed at each receiver."""
        return jax.ops.segment_sum(edge_values, self.receivers, num_segments=self.num_nodes)

    def mean_incoming(self, edge_values: jax.Array) -> jax.Array:
        """``[n_edge_total, ...] -> [n_node_total, ...]``, averaged over the N - 1 neighbours."""
        return self.sum_incoming(edge_values) * self.inverse_neighbor_count


# --- One layer ------------------------------------------------------------------


class MLP(nn.Module):
    """Two affine layers with SiLU between them, and optionally after the last.

    The last layer may have no bias and its own kernel init (``phi_x``).
    """

    hidden_dim: int
    out_dim: int
    final_activation: bool = False
    final_bias: bool = True
    final_kernel_init: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.silu(Linear(self.hidden_dim, param_dtype=self.param_dtype)(x))
        x = Linear(
            self.out_dim, use_bias=self.final_bias, kernel_init=self.final_kernel_init, param_dtype=self.param_dtype
        )(x)
        return nn.silu(x) if self.final_activation else x


class EGNNLayer(nn.Module):
    """One EGNN_vel layer: message, coordinate update, feature update.

    Call with ``h [n, H]``, ``x [n, 3]``, ``v [n, 3]``, edge attributes
    ``[e, A]`` and a message-passing object (see
    :class:`SegmentMessagePassing`). Returns the updated ``(h, x)``.
    """

    hidden_dim: int
    norm_diff: bool = False
    coords_tanh: bool = False
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, x, v, edge_attr, message_passing: SegmentMessagePassing):
        dtype = self.param_dtype
        diff = message_passing.at_receivers(x) - message_passing.at_senders(x)  # [e, 3], x_i - x_j
        radial = jnp.sum(diff**2, axis=-1, keepdims=True)  # [e, 1]

        edge_input = jnp.concatenate(
            [message_passing.at_receivers(h), message_passing.at_senders(h), radial, edge_attr], axis=-1
        )  # [e, 2H + 1 + A]
        messages = MLP(self.hidden_dim, self.hidden_dim, final_activation=True, param_dtype=dtype, name="phi_e")(
            edge_input
        )  # [e, H]

        if self.norm_diff:
            diff = diff / (geometry.safe_norm(diff, keepdims=True) + 1.0)
        edge_weight = MLP(
            self.hidden_dim,
            1,
            final_bias=False,
            final_kernel_init=xavier_uniform_init(0.001),
            param_dtype=dtype,
            name="phi_x",
        )(messages)  # [e, 1]
        if self.coords_tanh:
            edge_weight = jnp.tanh(edge_weight)
        # The clip acts on the product, per edge and coordinate, as in the reference.
        shifts = jnp.clip(diff * edge_weight, -COORDINATE_CLIP, COORDINATE_CLIP)  # [e, 3]
        velocity_weight = MLP(self.hidden_dim, 1, param_dtype=dtype, name="phi_v")(h)  # [n, 1], from the old h
        x = x + message_passing.mean_incoming(shifts) + velocity_weight * v

        node_input = jnp.concatenate([h, message_passing.sum_incoming(messages)], axis=-1)  # [n, 2H]
        h = h + MLP(self.hidden_dim, self.hidden_dim, param_dtype=dtype, name="phi_h")(node_input)
        return h, x


# --- The network ----------------------------------------------------------------


class EGNN(nn.Module):
    """EGNN_vel over a padded jraph batch, returning predicted positions ``[n_node_total, 3]``.

    Input: a batch in the layout of :mod:`geonorm_jax.graphs` (nodes ``x``,
    ``v``, ``h``; edges ``charge_product``). Padding nodes get finite
    outputs and change no output of a real node. Jit-able; one compile per
    padded shape.

    Attributes:
      num_layers: EGNN layers.
      hidden_dim: width ``H`` of ``h``, messages and MLP hidden layers.
      norm: coordinate norm, ``"none"``, ``"layernorm"``, ``"scalenorm"``
        or ``"geonorm"``.
      norm_mode: ``"particle"`` (per-particle ``g_i``, ``b_i``; needs
        ``num_particles``), ``"shared"`` or ``"adaptive"`` (from ``h_i``).
      sigma: GeoNorm's scale, ``"particle"`` (``|x_i - mu|``, the paper) or
        ``"system"`` (RMS distance to the centroid).
      scalenorm_kind: ``"l2"`` or ``"rms"``.
      norm_placement: ``"between"`` (after the coordinate update of every
        layer but the last) or ``"every"`` (after every layer).
      norm_diff: use ``(x_i - x_j) / (|x_i - x_j| + 1)`` in the coordinate update.
      coords_tanh: apply tanh to ``phi_x``'s output.
      h_layernorm: apply a feature LayerNorm to ``h`` after every layer.
      num_particles: ``N`` of every system; required for
        ``norm_mode="particle"`` with a norm, and checked against the batch.
      eps: constant inside the square roots of the coordinate norms.
      edge_input_distance: append the input positions' squared distance to
        the edge attributes, as the reference does.
      param_dtype: dtype of the parameters (float64 for precision checks).
    """

    num_layers: int = 4
    hidden_dim: int = 64
    norm: str = "none"
    norm_mode: str = "particle"
    sigma: str = "particle"
    scalenorm_kind: str = "l2"
    norm_placement: str = "between"
    norm_diff: bool = False
    coords_tanh: bool = False
    h_layernorm: bool = False
    num_particles: int | None = None
    eps: float = norms.DEFAULT_EPS
    edge_input_distance: bool = True
    param_dtype: Any = jnp.float32

    def _validate(self, graph: jraph.GraphsTuple) -> None:
        for name, value, choices in (
            ("norm", self.norm, NORMS),
            ("norm_mode", self.norm_mode, norms.MODES),
            ("sigma", self.sigma, norms.SIGMAS),
            ("scalenorm_kind", self.scalenorm_kind, norms.SCALENORM_KINDS),
            ("norm_placement", self.norm_placement, PLACEMENTS),
        ):
            if value not in choices:
                raise ValueError(f"invalid EGNN {name} {value!r}; expected one of {choices}")
        if self.norm == "none" or self.norm_mode != "particle":
            return
        if self.num_particles is None:
            raise ValueError(
                f"norm={self.norm!r} with norm_mode='particle' has one scale per particle and needs "
                "num_particles; set EGNN(num_particles=N) or use norm_mode='shared' or 'adaptive'"
            )
        shape = graphs.dense_shape(graph)
        if shape is None or shape[1] != self.num_particles:
            found = "a layout other than graphs.build_graphs" if shape is None else f"N={shape[1]}"
            raise ValueError(
                f"the model was built for num_particles={self.num_particles} but the batch has {found}; "
                "rebuild the model with the batch's N or use norm_mode='shared' or 'adaptive'"
            )

    def _norm_module(self, layer: int) -> nn.Module:
        common = dict(mode=self.norm_mode, num_particles=self.num_particles, eps=self.eps, name=f"norm_{layer}")
        if self.norm == "layernorm":
            return norms.CoordinateLayerNorm(**common)
        if self.norm == "scalenorm":
            return norms.ScaleNorm(kind=self.scalenorm_kind, **common)
        return norms.GeoNorm(sigma=self.sigma, **common)

    @nn.compact
    def __call__(self, graph: jraph.GraphsTuple) -> jax.Array:
        self._validate(graph)
        x = graph.nodes["x"]
        v = graph.nodes["v"]
        dtype = jnp.result_type(x.dtype, self.param_dtype)
        index = geometry.system_index(graph)
        message_passing = SegmentMessagePassing.from_graph(graph, index, dtype)

        edge_attr = graph.edges["charge_product"]  # [e, 1]
        if self.edge_input_distance:
            # NOTE: the reference appends |x0_i - x0_j|**2 of the input
            # positions to q_i q_j, so phi_e's input is 2H + 3 wide (134,020
            # parameters at H=64, 4 layers). Set False for the 2H + 2 input
            # that the EGNN paper's equations describe.
            input_diff = message_passing.at_receivers(x) - message_passing.at_senders(x)  # [e, 3]
            input_radial = jnp.sum(input_diff**2, axis=-1, keepdims=True)  # [e, 1]
            edge_attr = jnp.concatenate([edge_attr, input_radial], axis=-1)  # [e, 2]

        mu0 = geometry.segment_centroid(x, index) if self.norm == "geonorm" else None  # [n_graph, 3]
        h = Linear(self.hidden_dim, param_dtype=self.param_dtype, name="embedding")(graph.nodes["h"])

        for layer in range(self.num_layers):
            h, x = EGNNLayer(
                self.hidden_dim,
                norm_diff=self.norm_diff,
                coords_tanh=self.coords_tanh,
                param_dtype=self.param_dtype,
                name=f"layer_{layer}",
            )(h, x, v, edge_attr, message_passing)
            if self.h_layernorm:
                # NOTE: not in the reference; a standard feature LayerNorm that
                # keeps h bounded in deep or large-N networks.
                h = nn.LayerNorm(param_dtype=self.param_dtype, name=f"h_layernorm_{layer}")(h)
            is_last = layer == self.num_layers - 1
            if self.norm != "none" and (self.norm_placement == "every" or not is_last):
                norm_h = h if self.norm_mode == "adaptive" else None
                if self.norm == "geonorm":
                    x = self._norm_module(layer)(x, mu0, index, h=norm_h)
                else:
                    x = self._norm_module(layer)(x, index, h=norm_h)
        return x


def count_params(params) -> int:
    """Return the number of scalar parameters in a pytree."""
    return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(params)))
