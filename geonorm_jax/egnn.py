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

Two implementations share one parameter pytree, and both apply phi_e's
first layer to ``h`` once per node (:func:`phi_e_node_parts`):

* the segment path (:class:`EGNNLayer` with :class:`SegmentMessagePassing`)
  gathers node values per edge of a jraph edge list and sums them back with
  ``segment_sum``. It accepts any padded batch.
* the dense path (:class:`DenseEGNNLayer`) views a batch in the layout of
  :func:`geonorm_jax.graphs.build_graphs` as ``[B, N, ...]`` node arrays and
  ``[B, N, N, ...]`` pair arrays. Sums over senders become reductions over
  an axis. The pair stage's gradient is written out by hand
  (:func:`dense_edge_stage`). On CPU the pair work runs one chunk of
  systems at a time, so that its ``[b, N, N, H]`` arrays stay in cache.
* the fused path is the dense path with its pair stage in one compiled CPU
  kernel (:mod:`geonorm_jax.cpu_kernel`), which keeps the pair arrays in
  cache tile by tile.

:class:`EGNN` takes the fused path when the batch has that layout, its
kernel fits the model and systems have at least :data:`FUSED_MIN_PARTICLES`
particles. Otherwise it takes the dense path for systems of at least
:data:`DENSE_MIN_PARTICLES` particles, and the segment path. All give the same outputs up to float32 rounding.
A fourth, naive path (``message_passing="naive"``) is the segment path with
phi_e applied to the concatenated per-edge input, as in the reference code.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph
import numpy as np

from geonorm_jax import cpu_kernel, geometry, graphs, norms

NORMS = ("none", "layernorm", "scalenorm", "geonorm")
PLACEMENTS = ("between", "every")
MESSAGE_PASSING = ("auto", "fused", "dense", "segment", "naive")
COORDINATE_CLIP = 100.0

# NOTE: both chosen by measurement, not derived, on a 2-core AMD EPYC (Zen 4,
# 1 MiB L2 per core, 32 MiB L3; jax 0.10.2), training batches of 50. At N=50
# chunks of 3.2 MB trained 4% faster than chunks of 1.3 MB and 8% faster than
# 6.4 MB. At N=12, 16 and 20 the whole batch in one piece (1.8 to 5.1 MB)
# trained 1.3 to 1.8x slower than in chunks of 0.9 to 2.6 MB, while at N=5
# (batch 100, 0.6 MB) one piece trained 1.25x faster than two chunks.
CPU_CHUNK_BYTES = 3_276_800
CPU_WHOLE_BATCH_BYTES = 2**20

# NOTE: measured, not derived. On a 2-core AMD EPYC (jax 0.10.2) the segment
# path trained N=5 batches of 100 1.36x faster than the dense path and N=8
# batches of 50 1.17x faster. The dense path was 1.2x faster at N=10 and 1.25x
# at N=12 (batches of 50), and 1.26x at N=8 with batches of 100.
DENSE_MIN_PARTICLES = 10

# NOTE: measured, not derived, on the same 2-core EPYC. The fused path trained
# N=5 batches of 100 as fast as the segment path (11,300 to 11,900 graphs/s
# each) and evaluated them 1.05 to 1.4x faster, N=8 batches of 50 1.17x
# faster, and N=3 batches of 100 8% slower.
FUSED_MIN_PARTICLES = 5


def auto_message_passing(dense_shape: tuple[int, int] | None, fused_fits: bool = False) -> str:
    """Return the path that ``message_passing="auto"`` takes for a batch's ``graphs.dense_shape``.

    ``fused_fits`` tells whether the fused kernel can run the model
    (:meth:`EGNN.fused_kernel_problem` is None). For a ``(B, N)`` shape the
    path is ``"fused"`` if it fits and ``N >= FUSED_MIN_PARTICLES``, else
    ``"dense"`` if ``N >= DENSE_MIN_PARTICLES``. Smaller systems and batches
    without that layout take ``"segment"``.
    """
    if dense_shape is None:
        return "segment"
    if fused_fits and dense_shape[1] >= FUSED_MIN_PARTICLES:
        return "fused"
    if dense_shape[1] >= DENSE_MIN_PARTICLES:
        return "dense"
    return "segment"


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


class LinearWeights(nn.Module):
    """The ``kernel`` and ``bias`` of a :class:`Linear`, returned instead of applied.

    Same names, shapes, initializers and creation order as :class:`Linear`,
    so a model that applies a layer in pieces (e.g. one kernel slice per
    input block) has the parameters of one that applies it whole.
    """

    features: int
    use_bias: bool = True
    kernel_init: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, fan_in: int) -> tuple[jax.Array, jax.Array | None]:
        kernel_init = self.kernel_init or torch_linear_kernel_init()
        kernel = self.param("kernel", kernel_init, (fan_in, self.features), self.param_dtype)
        if not self.use_bias:
            return kernel, None
        return kernel, self.param("bias", torch_linear_bias_init(fan_in), (self.features,), self.param_dtype)


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


class MLPWeights(nn.Module):
    """The parameters of an :class:`MLP` with the same settings, returned instead of applied.

    Returns ``((kernel_0, bias_0), (kernel_1, bias_1))``, ``bias_1`` None
    without a final bias.
    """

    hidden_dim: int
    out_dim: int
    final_bias: bool = True
    final_kernel_init: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, fan_in: int):
        first = LinearWeights(self.hidden_dim, param_dtype=self.param_dtype, name="Linear_0")(fan_in)
        last = LinearWeights(
            self.out_dim,
            use_bias=self.final_bias,
            kernel_init=self.final_kernel_init,
            param_dtype=self.param_dtype,
            name="Linear_1",
        )(self.hidden_dim)
        return first, last


def _silu(x: jax.Array) -> jax.Array:
    """SiLU as ``x (1 + tanh(x / 2)) / 2``, equal to ``x sigmoid(x)`` up to rounding.

    NOTE: on XLA's CPU backend (jax 0.10.2) ``nn.silu`` lowers to an exp and
    a division per element. The tanh form trained the dense N=50 model about
    1.25x faster on a 2-core AMD EPYC, and it differs from ``nn.silu`` by a
    few float32 ulp.
    """
    return x * (0.5 + 0.5 * jnp.tanh(0.5 * x))


def phi_e_node_parts(h: jax.Array, kernel_0: jax.Array, bias_0: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Apply phi_e's first layer to the ``h`` blocks of its input ``[h_i, h_j, ...]``, once per node.

    ``h [..., F]`` and the layer's ``kernel_0 [2 F + 1 + A, H]`` and
    ``bias_0 [H]`` give ``receiver_part = h @ kernel_0[:F] + bias_0`` and
    ``sender_part = h @ kernel_0[F:2F]``, each ``[..., H]``. An edge's
    pre-activation is ``receiver_part[i] + sender_part[j]`` plus the
    remaining rows applied to ``[|x_i - x_j|**2, a_ij]``. That is the same
    affine map, at ``2 F`` multiply-adds per node instead of per edge.
    """
    feature_dim = h.shape[-1]
    return h @ kernel_0[:feature_dim] + bias_0, h @ kernel_0[feature_dim : 2 * feature_dim]


class EGNNLayer(nn.Module):
    """One EGNN_vel layer: message, coordinate update, feature update.

    Call with ``h [n, H]``, ``x [n, 3]``, ``v [n, 3]``, edge attributes
    ``[e, A]`` and a message-passing object (see
    :class:`SegmentMessagePassing`). Returns the updated ``(h, x)``.

    With ``phi_e_per_node`` (the default) phi_e's first layer multiplies
    ``h`` once per node (:func:`phi_e_node_parts`). Without it, phi_e acts
    on the concatenated per-edge input, line for line the reference code.
    Both have the same parameters and agree up to float32 rounding.
    """

    hidden_dim: int
    norm_diff: bool = False
    coords_tanh: bool = False
    param_dtype: Any = jnp.float32
    phi_e_per_node: bool = True

    @nn.compact
    def __call__(self, h, x, v, edge_attr, message_passing: SegmentMessagePassing):
        dtype = self.param_dtype
        diff = message_passing.at_receivers(x) - message_passing.at_senders(x)  # [e, 3], x_i - x_j
        radial = jnp.sum(diff**2, axis=-1, keepdims=True)  # [e, 1]

        if self.phi_e_per_node:
            feature_dim = h.shape[-1]
            fan_in = 2 * feature_dim + 1 + edge_attr.shape[-1]
            (kernel_0, bias_0), (kernel_1, bias_1) = MLPWeights(
                self.hidden_dim, self.hidden_dim, param_dtype=dtype, name="phi_e"
            )(fan_in)
            receiver_part, sender_part = phi_e_node_parts(h, kernel_0, bias_0)  # [n, H] each
            pre_activation = (
                message_passing.at_receivers(receiver_part)
                + message_passing.at_senders(sender_part)
                + jnp.concatenate([radial, edge_attr], axis=-1) @ kernel_0[2 * feature_dim :]
            )  # [e, H]
            messages = _silu(_silu(pre_activation) @ kernel_1 + bias_1)  # [e, H]
        else:
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


# --- One layer on dense per-system arrays ----------------------------------------


def edges_to_dense(edge_values: jax.Array, batch_size: int, n_particles: int) -> jax.Array:
    """Scatter receiver-major per-edge values of full systems onto ``[B, N, N, ...]``, 0 on the diagonal.

    ``edge_values [B * N * (N - 1), ...]`` in the order of
    :func:`geonorm_jax.graphs.fully_connected_edges`. Row ``i`` of a system
    lists the senders ``j != i``, so the flat ``N * (N - 1)`` values of a
    system are the ``N * N`` row-major matrix without the entries at
    ``i * (N + 1)``. Only reshapes and one pad; jit-able.
    """
    tail = edge_values.shape[1:]
    n = n_particles
    values = edge_values.reshape(batch_size, n - 1, n, *tail)  # off-diagonal entries, N per row
    values = jnp.pad(values, [(0, 0), (0, 0), (0, 1)] + [(0, 0)] * len(tail))  # [B, N-1, N+1, ...]
    values = values.reshape(batch_size, (n - 1) * (n + 1), *tail)
    values = jnp.pad(values, [(0, 0), (1, 0)] + [(0, 0)] * len(tail))  # [B, N*N, ...]
    return values.reshape(batch_size, n, n, *tail)


def _silu_and_derivative(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Return ``(silu(x), silu'(x))``, with ``silu' = s (1 + x (1 - s))`` and ``s = sigmoid(x)`` in tanh form."""
    sigmoid = 0.5 + 0.5 * jnp.tanh(0.5 * x)
    return x * sigmoid, sigmoid * (1.0 + x * (1.0 - sigmoid))


class PairWeights(NamedTuple):
    """The parameters that act per pair in :func:`dense_edge_stage`.

    phi_e's first layer acts on ``[h_i, h_j, |x_i - x_j|**2, a_ij]``. Its
    ``h`` rows act once per node, before the pair stage. Its other rows
    are ``pair_kernel``.
    """

    pair_kernel: jax.Array  # [1 + A, H], phi_e's rows for |x_i - x_j|**2 and a_ij
    phi_e_kernel_1: jax.Array  # [H, H]
    phi_e_bias_1: jax.Array  # [H]
    phi_x_kernel_0: jax.Array  # [H, H]
    phi_x_bias_0: jax.Array  # [H]
    phi_x_kernel_1: jax.Array  # [H, 1]


def _pair_features(x: jax.Array, edge_attr: jax.Array) -> jax.Array:
    """Stack ``[|x_i - x_j|**2, a_ij]`` per pair.

    ``x [b, N, 3]`` and ``edge_attr [b, N, N, A]`` give ``[b, N, N, 1 + A]``.
    """
    diff = x[:, :, None, :] - x[:, None, :, :]  # [b, N, N, 3], x_i - x_j
    radial = jnp.sum(diff**2, axis=-1, keepdims=True)
    return jnp.concatenate([radial, edge_attr], axis=-1)


def _mean_shift(x: jax.Array, edge_weight: jax.Array, norm_diff: bool, coords_tanh: bool) -> jax.Array:
    """Compute the coordinate update ``1/(N-1) sum_j clip((x_i - x_j) w_ij, -100, 100)``.

    ``x [b, N, 3]`` and ``edge_weight`` w ``[b, N, N]`` give ``[b, N, 3]``.
    """
    n_particles = x.shape[-2]
    diff = x[:, :, None, :] - x[:, None, :, :]  # [b, N, N, 3]
    edge_weight = edge_weight[..., None]
    if coords_tanh:
        edge_weight = jnp.tanh(edge_weight)
    if norm_diff:
        diff = diff / (geometry.safe_norm(diff, keepdims=True) + 1.0)
    # Self-pairs have diff = 0, so their shift is 0 and needs no mask.
    shifts = jnp.clip(diff * edge_weight, -COORDINATE_CLIP, COORDINATE_CLIP)  # [b, N, N, 3]
    return jnp.sum(shifts, axis=2) * (1.0 / max(n_particles - 1, 1))


def _sum_over_pairs(a: jax.Array, b: jax.Array) -> jax.Array:
    """Return ``sum_e a[e, p] b[q, e]``, ``[P, Q]``, for ``a [E, P]`` and ``b [Q, E]``."""
    return jax.lax.dot_general(a, b, (((0,), (1,)), ((), ())))


def _off_diagonal(n_particles: int) -> jax.Array:
    """Return the ``[N, N]`` mask that is False where ``i == j``."""
    return ~jnp.eye(n_particles, dtype=bool)


def _pair_mlp(weights: PairWeights, receiver_part, sender_part, pair_features):
    """Return the pre-activations of phi_e's two layers and phi_x's hidden layer on every pair.

    Args:
      weights: the per-pair parameters.
      receiver_part, sender_part: ``[b, N, H]``.
      pair_features: ``[b, N, N, 1 + A]``.

    Returns:
      ``pre_1 [E, H]``, pair-major, and ``pre_2``, ``pre_3`` ``[H, E]``,
      feature-major, with ``E = b N N`` pairs in ``(system, i, j)`` order.
      The messages are ``m_ij = silu(pre_2)``.
    """
    # NOTE: the layouts are chosen by measurement on XLA's CPU backend (jax
    # 0.10.2). Built pair-major, pre_1's broadcasts ran about 10x faster than
    # feature-major. With pre_2 and pre_3 feature-major, XLA made no
    # transposed copy of a pair array for the weight gradients. A pair-major
    # pre_2 trained at the same speed within the noise.
    pre_1 = receiver_part[:, :, None, :] + sender_part[:, None, :, :]  # [b, N, N, H]
    for k in range(pair_features.shape[-1]):
        pre_1 = pre_1 + pair_features[..., k : k + 1] * weights.pair_kernel[k]
    pre_1 = pre_1.reshape(-1, pre_1.shape[-1])
    pre_2 = _sum_over_pairs(weights.phi_e_kernel_1, _silu(pre_1)) + weights.phi_e_bias_1[:, None]
    pre_3 = weights.phi_x_kernel_0.T @ _silu(pre_2) + weights.phi_x_bias_0[:, None]
    return pre_1, pre_2, pre_3


def _edge_stage(norm_diff, coords_tanh, weights, receiver_part, sender_part, x, edge_attr):
    """Compute :func:`dense_edge_stage` without its custom gradient."""
    b, n, hidden = receiver_part.shape
    _, pre_2, pre_3 = _pair_mlp(weights, receiver_part, sender_part, _pair_features(x, edge_attr))
    messages = _silu(pre_2).reshape(hidden, b, n, n)
    incoming = jnp.sum(jnp.where(_off_diagonal(n), messages, 0.0), axis=-1)  # [H, b, N]
    # phi_x's last layer (H -> 1, no bias) as a product with its [H] kernel.
    edge_weight = (weights.phi_x_kernel_1[:, 0] @ _silu(pre_3)).reshape(b, n, n)
    return jnp.transpose(incoming, (1, 2, 0)), _mean_shift(x, edge_weight, norm_diff, coords_tanh)


def _edge_stage_forward(norm_diff, coords_tanh, weights, receiver_part, sender_part, x, edge_attr):
    # Only the node-size inputs are kept. The backward pass computes the
    # pair arrays again, which on CPU is faster than storing them and
    # reading them back from memory.
    outputs = _edge_stage(norm_diff, coords_tanh, weights, receiver_part, sender_part, x, edge_attr)
    return outputs, (weights, receiver_part, sender_part, x, edge_attr)


def _edge_stage_backward(norm_diff, coords_tanh, residuals, cotangents):
    weights, receiver_part, sender_part, x, edge_attr = residuals
    incoming_grad, shift_grad = cotangents  # [b, N, H], [b, N, 3]
    b, n, hidden = receiver_part.shape
    pair_features, pair_features_vjp = jax.vjp(_pair_features, x, edge_attr)
    pre_1, pre_2, pre_3 = _pair_mlp(weights, receiver_part, sender_part, pair_features)
    hidden_1, slope_1 = _silu_and_derivative(pre_1)  # [E, H]
    messages, slope_2 = _silu_and_derivative(pre_2)  # [H, E]
    hidden_3, slope_3 = _silu_and_derivative(pre_3)  # [H, E]
    edge_weight = (weights.phi_x_kernel_1[:, 0] @ hidden_3).reshape(b, n, n)

    # The tanh, norm and clip of the coordinate update act on [b, N, N, 3]
    # arrays, small enough for plain autodiff.
    _, shift_vjp = jax.vjp(lambda x, w: _mean_shift(x, w, norm_diff, coords_tanh), x, edge_weight)
    x_grad, edge_weight_grad = shift_vjp(shift_grad)
    edge_weight_grad = edge_weight_grad.reshape(1, -1)  # [1, E]

    # Gradients of phi_x, from its output backwards.
    phi_x_kernel_1_grad = hidden_3 @ edge_weight_grad.T  # [H, 1]
    pre_3_grad = weights.phi_x_kernel_1 * edge_weight_grad * slope_3  # [H, E]
    phi_x_kernel_0_grad = messages @ pre_3_grad.T
    phi_x_bias_0_grad = jnp.sum(pre_3_grad, axis=1)

    # The messages feed phi_x and, off the diagonal, the sum over senders.
    incoming_grad = jnp.transpose(incoming_grad, (2, 0, 1))[:, :, :, None]  # [H, b, N, 1]
    incoming_grad = jnp.where(_off_diagonal(n), incoming_grad, 0.0).reshape(hidden, -1)
    pre_2_grad = (weights.phi_x_kernel_0 @ pre_3_grad + incoming_grad) * slope_2  # [H, E]
    phi_e_kernel_1_grad = _sum_over_pairs(hidden_1, pre_2_grad)
    phi_e_bias_1_grad = jnp.sum(pre_2_grad, axis=1)

    pre_1_grad = (pre_2_grad.T @ weights.phi_e_kernel_1.T) * slope_1  # [E, H]
    feature_rows = pair_features.reshape(-1, pair_features.shape[-1])  # [E, 1 + A]
    pair_kernel_grad = feature_rows.T @ pre_1_grad  # [1 + A, H]
    pair_features_grad = (pre_1_grad @ weights.pair_kernel.T).reshape(pair_features.shape)
    features_x_grad, edge_attr_grad = pair_features_vjp(pair_features_grad)
    weights_grad = PairWeights(
        pair_kernel_grad,
        phi_e_kernel_1_grad,
        phi_e_bias_1_grad,
        phi_x_kernel_0_grad,
        phi_x_bias_0_grad,
        phi_x_kernel_1_grad,
    )
    pre_1_grad = pre_1_grad.reshape(b, n, n, hidden)
    receiver_grad = jnp.sum(pre_1_grad, axis=2)  # [b, N, H]
    sender_grad = jnp.sum(pre_1_grad, axis=1)  # [b, N, H]
    return weights_grad, receiver_grad, sender_grad, x_grad + features_x_grad, edge_attr_grad


_fused_edge_stage = jax.custom_vjp(_edge_stage, nondiff_argnums=(0, 1))
_fused_edge_stage.defvjp(_edge_stage_forward, _edge_stage_backward)


def dense_edge_stage(
    weights: PairWeights,
    receiver_part: jax.Array,
    sender_part: jax.Array,
    x: jax.Array,
    edge_attr: jax.Array,
    *,
    norm_diff: bool,
    coords_tanh: bool,
) -> tuple[jax.Array, jax.Array]:
    """Compute one layer's per-pair work on systems ``[b, N, ...]`` and reduce it per receiver.

    Args:
      weights: the per-pair parameters of phi_e and phi_x.
      receiver_part: ``h_i`` times phi_e's receiver rows, plus its bias, ``[b, N, H]``.
      sender_part: ``h_j`` times phi_e's sender rows, ``[b, N, H]``.
      x: positions ``[b, N, 3]``.
      edge_attr: ``[b, N, N, A]``, any values on the diagonal.
      norm_diff, coords_tanh: as in :class:`EGNNLayer`.

    Returns:
      ``(incoming, shift)``: ``sum_{j != i} m_ij`` ``[b, N, H]`` and
      ``1/(N-1) sum_j clip((x_i - x_j) phi_x(m_ij))`` ``[b, N, 3]``.

    The gradient is written out by hand (``jax.custom_vjp``). It keeps only
    the inputs, computes the ``b N N x H`` pair arrays once more, and
    takes each weight gradient as one matrix product over all pairs. It
    equals autodiff of the forward pass up to rounding. The function is
    pure and can be jitted, vmapped and scanned.
    """
    return _fused_edge_stage(norm_diff, coords_tanh, weights, receiver_part, sender_part, x, edge_attr)


def _chunk_size(batch_size: int, n_particles: int, hidden_dim: int, target_bytes: int) -> int:
    """Return the largest divisor of ``batch_size`` whose ``[b, N, N, H]`` float32 array fits ``target_bytes``."""
    per_system = _pair_array_bytes(1, n_particles, hidden_dim)
    best = 1
    for size in range(1, batch_size + 1):
        if batch_size % size == 0 and size * per_system <= target_bytes:
            best = size
    return best


def _pair_array_bytes(batch_size: int, n_particles: int, hidden_dim: int) -> int:
    """Return the size of one ``[B, N, N, H]`` float32 pair array."""
    return batch_size * n_particles * n_particles * hidden_dim * 4


def cpu_chunk_bytes(batch_size: int, n_particles: int, hidden_dim: int) -> int:
    """Return the ``chunk_bytes`` that :class:`EGNN` picks on the CPU backend.

    A batch whose ``[B, N, N, H]`` pair array fits
    :data:`CPU_WHOLE_BATCH_BYTES` runs in one piece (0). A larger one runs
    in chunks of at most :data:`CPU_CHUNK_BYTES`, and of at most half the
    batch, so that it never runs in one piece.
    """
    batch_bytes = _pair_array_bytes(batch_size, n_particles, hidden_dim)
    if batch_bytes <= CPU_WHOLE_BATCH_BYTES:
        return 0
    return min(CPU_CHUNK_BYTES, batch_bytes // 2)


class DenseEGNNLayer(nn.Module):
    """:class:`EGNNLayer` on dense per-system arrays, with the same parameters.

    Call with ``h [B, N, F]``, ``x [B, N, 3]``, ``v [B, N, 3]`` and edge
    attributes ``[B, N, N, A]`` (any values on the diagonal). Every pair
    ``(i, j)`` with ``i != j`` is an edge. Returns the updated ``(h, x)``.

    With ``chunk_bytes > 0`` the pair work (:func:`dense_edge_stage`) runs
    under ``jax.lax.map``, one chunk of systems at a time, so that a
    chunk's pair arrays stay in cache through the forward pass and again
    through the backward pass, which computes them once more.

    With ``fused=True`` the pair work runs in the compiled CPU kernel
    (:func:`geonorm_jax.cpu_kernel.pair_stage`), whole batch at once, and
    ``chunk_bytes`` is not used. It needs ``norm_diff`` and ``coords_tanh``
    off, float32 and ``H`` a multiple of 16.
    """

    hidden_dim: int
    norm_diff: bool = False
    coords_tanh: bool = False
    param_dtype: Any = jnp.float32
    chunk_bytes: int = 0
    fused: bool = False

    @nn.compact
    def __call__(self, h, x, v, edge_attr):
        dtype = self.param_dtype
        hidden = self.hidden_dim
        feature_dim = h.shape[-1]
        fan_in = 2 * feature_dim + 1 + edge_attr.shape[-1]
        (kernel_0, bias_0), (kernel_1, bias_1) = MLPWeights(hidden, hidden, param_dtype=dtype, name="phi_e")(fan_in)
        phi_x = MLPWeights(
            hidden, 1, final_bias=False, final_kernel_init=xavier_uniform_init(0.001), param_dtype=dtype, name="phi_x"
        )(hidden)
        weights = PairWeights(kernel_0[2 * feature_dim :], kernel_1, bias_1, *phi_x[0], phi_x[1][0])
        if self.fused:
            # The kernel tiles the pairs itself, so it takes the whole batch.
            stage = functools.partial(cpu_kernel.pair_stage, weights)
        else:
            stage = functools.partial(
                dense_edge_stage, weights, norm_diff=self.norm_diff, coords_tanh=self.coords_tanh
            )
        receiver_part, sender_part = phi_e_node_parts(h, kernel_0, bias_0)  # [B, N, H] each
        arrays = (receiver_part, sender_part, x, edge_attr)

        batch_size, n_particles = x.shape[:2]
        chunk = batch_size
        if self.chunk_bytes > 0 and not self.fused:
            chunk = _chunk_size(batch_size, n_particles, hidden, self.chunk_bytes)
        if chunk == batch_size:
            incoming, shift = stage(*arrays)
        else:

            def split(values):
                return values.reshape(batch_size // chunk, chunk, *values.shape[1:])  # [B/b, b, ...]

            incoming, shift = jax.lax.map(lambda chunk_arrays: stage(*chunk_arrays), tuple(map(split, arrays)))
            incoming = incoming.reshape(batch_size, n_particles, hidden)
            shift = shift.reshape(batch_size, n_particles, 3)

        velocity_weight = MLP(hidden, 1, param_dtype=dtype, name="phi_v")(h)  # [B, N, 1], from the old h
        x = x + shift + velocity_weight * v

        node_input = jnp.concatenate([h, incoming], axis=-1)  # [B, N, 2H]
        h = h + MLP(hidden, hidden, param_dtype=dtype, name="phi_h")(node_input)
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
      message_passing: ``"auto"`` (the choice of
        :func:`auto_message_passing`, by the batch's
        :func:`geonorm_jax.graphs.dense_shape` and
        :meth:`fused_kernel_problem`), ``"fused"`` or
        ``"dense"`` (both raise on other batches, and ``"fused"`` where
        its kernel does not fit), ``"segment"``, or ``"naive"``: the
        segment path with phi_e applied to the concatenated per-edge input,
        line for line the reference code. The naive path is the slowest and
        is kept as the benchmarks' baseline.
      chunk_bytes: dense path only. The pair arrays of one layer are
        computed for as many systems at a time as keep one ``[b, N, N, H]``
        float32 array within this many bytes (a divisor of ``B``, at least
        one system). 0 computes the whole batch at once. None picks
        :func:`cpu_chunk_bytes` on the CPU backend and 0 on others.
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
    message_passing: str = "auto"
    chunk_bytes: int | None = None

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

    def fused_kernel_problem(self, dtype: Any) -> str | None:
        """Return why the fused CPU kernel cannot run this model on ``dtype`` inputs, or None if it can.

        The kernel runs on the CPU backend, in float32, with ``hidden_dim`` a
        multiple of 16 and ``norm_diff`` and ``coords_tanh`` off, and where
        :func:`geonorm_jax.cpu_kernel.unavailable_reason` is None (the first
        call compiles it).
        """
        if jax.default_backend() != "cpu":
            return f"it runs on the CPU backend, not {jax.default_backend()}"
        for name, value in (("input dtype", dtype), ("param_dtype", self.param_dtype)):
            if jnp.dtype(value) != jnp.float32:
                return f"it computes in float32, but the {name} is {jnp.dtype(value)}"
        if self.hidden_dim % 16:
            return f"it needs hidden_dim a multiple of 16, not {self.hidden_dim}"
        if self.norm_diff or self.coords_tanh:
            return "it does not implement norm_diff or coords_tanh"
        return cpu_kernel.unavailable_reason()

    def _resolve_message_passing(self, graph: jraph.GraphsTuple) -> tuple[str, tuple[int, int] | None]:
        """Return the path that runs, and ``(B, N)`` for the fused and dense paths (None otherwise)."""
        if self.message_passing not in MESSAGE_PASSING:
            raise ValueError(
                f"invalid EGNN message_passing {self.message_passing!r}; expected one of {MESSAGE_PASSING}"
            )
        if self.chunk_bytes is not None and self.chunk_bytes < 0:
            raise ValueError(f"invalid EGNN chunk_bytes {self.chunk_bytes}; expected None, 0 or a positive size")
        if self.message_passing in ("segment", "naive"):
            return self.message_passing, None
        shape = graphs.dense_shape(graph)
        path = self.message_passing
        if path == "auto":
            # Ask about the kernel only where it could run, because the
            # first question compiles it.
            could_fuse = shape is not None and shape[1] >= FUSED_MIN_PARTICLES
            fits = could_fuse and self.fused_kernel_problem(graph.nodes["x"].dtype) is None
            path = auto_message_passing(shape, fused_fits=fits)
            return path, (None if path == "segment" else shape)
        if shape is None:
            raise ValueError(
                f"message_passing={path!r} needs a batch in the layout of graphs.build_graphs "
                "(n_node = B*N + 1, n_edge = B*N*(N-1) + 1, n_graph = B + 1); "
                "use message_passing='auto' or 'segment' for other batches"
            )
        if path == "fused":
            problem = self.fused_kernel_problem(graph.nodes["x"].dtype)
            if problem is not None:
                raise ValueError(
                    f"message_passing='fused' cannot run: {problem}; use message_passing='dense' or 'auto'"
                )
        return path, shape

    def _layer(self, layer: int, path: str, dense_shape: tuple[int, int] | None) -> nn.Module:
        """Return layer ``layer`` of path ``path``; ``dense_shape`` is ``(B, N)`` for the fused and dense paths."""
        options = dict(
            norm_diff=self.norm_diff, coords_tanh=self.coords_tanh, param_dtype=self.param_dtype, name=f"layer_{layer}"
        )
        if path == "fused":
            return DenseEGNNLayer(self.hidden_dim, fused=True, **options)
        if path == "dense":
            chunk_bytes = self.chunk_bytes
            if chunk_bytes is None:
                # Chunks serialize the pair work, which only pays where
                # cache is the limit, so accelerators get the whole batch.
                # NOTE: the dense path has not been timed on a GPU or TPU.
                on_cpu = jax.default_backend() == "cpu"
                chunk_bytes = cpu_chunk_bytes(*dense_shape, self.hidden_dim) if on_cpu else 0
            return DenseEGNNLayer(self.hidden_dim, chunk_bytes=chunk_bytes, **options)
        return EGNNLayer(self.hidden_dim, phi_e_per_node=path != "naive", **options)

    def _after_layer(self, layer: int, h, x, mu0, index):
        """Apply the optional feature LayerNorm and coordinate norm that follow layer ``layer``."""
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
        return h, x

    @nn.compact
    def __call__(self, graph: jraph.GraphsTuple) -> jax.Array:
        self._validate(graph)
        path, shape = self._resolve_message_passing(graph)
        if shape is not None:
            return self._dense_call(graph, path, *shape)

        x = graph.nodes["x"]
        v = graph.nodes["v"]
        dtype = jnp.result_type(x.dtype, self.param_dtype)
        index = geometry.system_index(graph)
        segments = SegmentMessagePassing.from_graph(graph, index, dtype)

        edge_attr = graph.edges["charge_product"]  # [e, 1]
        if self.edge_input_distance:
            # NOTE: the reference appends |x0_i - x0_j|**2 of the input
            # positions to q_i q_j, so phi_e's input is 2H + 3 wide (134,020
            # parameters at H=64, 4 layers). Set False for the 2H + 2 input
            # that the EGNN paper's equations describe.
            input_diff = segments.at_receivers(x) - segments.at_senders(x)  # [e, 3]
            input_radial = jnp.sum(input_diff**2, axis=-1, keepdims=True)  # [e, 1]
            edge_attr = jnp.concatenate([edge_attr, input_radial], axis=-1)  # [e, 2]

        mu0 = geometry.segment_centroid(x, index) if self.norm == "geonorm" else None  # [n_graph, 3]
        h = Linear(self.hidden_dim, param_dtype=self.param_dtype, name="embedding")(graph.nodes["h"])

        for layer in range(self.num_layers):
            h, x = self._layer(layer, path, None)(h, x, v, edge_attr, segments)
            h, x = self._after_layer(layer, h, x, mu0, index)
        return x

    def _dense_call(self, graph: jraph.GraphsTuple, path: str, batch_size: int, n_particles: int) -> jax.Array:
        """Run the network on the first ``B * N`` nodes as ``[B, N, ...]`` arrays.

        Systems of a ragged batch that hold only padding are zeros here, so
        their outputs are finite and they share no statistics with real
        systems. The nodes after the first ``B * N`` (the padding graph's
        extra node) keep their input positions.
        """
        n_real = batch_size * n_particles
        x_all = graph.nodes["x"]

        def dense(values):
            return values[:n_real].reshape(batch_size, n_particles, *values.shape[1:])

        x, v = dense(x_all), dense(graph.nodes["v"])  # [B, N, 3]
        n_pairs = batch_size * n_particles * (n_particles - 1)
        edge_attr = edges_to_dense(graph.edges["charge_product"][:n_pairs], batch_size, n_particles)  # [B, N, N, 1]
        if self.edge_input_distance:
            # NOTE: the reference's |x0_i - x0_j|**2; see the segment path above.
            input_diff = x[:, :, None, :] - x[:, None, :, :]  # [B, N, N, 3]
            input_radial = jnp.sum(input_diff**2, axis=-1, keepdims=True)  # [B, N, N, 1]
            edge_attr = jnp.concatenate([edge_attr, input_radial], axis=-1)  # [B, N, N, 2]

        mu0 = jnp.mean(x, axis=1) if self.norm == "geonorm" else None  # [B, 3]
        h = Linear(self.hidden_dim, param_dtype=self.param_dtype, name="embedding")(dense(graph.nodes["h"]))

        for layer in range(self.num_layers):
            h, x = self._layer(layer, path, (batch_size, n_particles))(h, x, v, edge_attr)
            h, x = self._after_layer(layer, h, x, mu0, None)
        return jnp.concatenate([x.reshape(n_real, 3), x_all[n_real:]], axis=0)


def count_params(params) -> int:
    """Return the number of scalar parameters in a pytree."""
    return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(params)))
