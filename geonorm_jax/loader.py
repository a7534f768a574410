"""Batches of padded ``GraphsTuple`` from a dataset split.

Every batch, the last ragged one included, is padded to the same static
budget (:func:`geonorm_jax.graphs.padding_budget`), so a jitted training step
compiles once per ``(N, batch_size)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import jax
import jraph
import numpy as np

from geonorm_jax import graphs
from geonorm_jax.dataset import Split

logger = logging.getLogger(__name__)


class GraphLoader:
    """Iterate over a split in padded batches of fully connected systems.

    Each system contributes node features ``x`` and ``v`` at ``input_frame``,
    ``h = |v|``, ``charge`` and the ``target`` positions at ``target_frame``,
    in the layout of :mod:`geonorm_jax.graphs`.

    Args:
      split: a dataset split with ``x, v [S, F, N, 3]`` and ``charges [S, N]``.
      frames: the frame index of each position along axis 1 of ``split.x``
        (``Dataset.frames``).
      batch_size: systems per batch, B (at least 1).
      input_frame, target_frame: frame indices of the input and the target,
        both among ``frames``.
      dtype: floating dtype of the batch features.

    Raises:
      ValueError: on ``N < 2``, ``batch_size < 1``, a frame not in
        ``frames``, inconsistent shapes or NaN/Inf in the split.
    """

    def __init__(
        self,
        split: Split,
        frames: tuple[int, ...],
        batch_size: int,
        input_frame: int = 30,
        target_frame: int = 40,
        dtype=np.float32,
    ):
        frames = tuple(int(f) for f in frames)
        x = np.asarray(split.x)
        v = np.asarray(split.v)
        charges = np.asarray(split.charges)
        if x.ndim != 4 or x.shape[-1] != 3 or v.shape != x.shape:
            raise ValueError(f"split arrays must be [S, F, N, 3]; got x {x.shape}, v {v.shape}")
        n_systems, n_frames, n_particles, _ = x.shape
        if n_particles < 2:
            raise ValueError(f"a system needs at least 2 particles to have edges, got N={n_particles}")
        if n_systems < 1:
            raise ValueError("the split is empty: it contains 0 systems")
        if len(frames) != n_frames:
            raise ValueError(f"frames {frames} name {len(frames)} frames but the arrays hold {n_frames}")
        if charges.shape != (n_systems, n_particles):
            raise ValueError(f"charges must be [S, N] = {(n_systems, n_particles)}, got {charges.shape}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        for name, frame in (("input_frame", input_frame), ("target_frame", target_frame)):
            if frame not in frames:
                raise ValueError(f"{name}={frame} is not among the kept frames {frames}; regenerate the dataset with it")

        input_position = frames.index(input_frame)
        target_position = frames.index(target_frame)

        # Convert once: per batch only a gather over systems remains.
        self._x = np.ascontiguousarray(x[:, input_position], dtype=dtype)  # [S, N, 3]
        self._v = np.ascontiguousarray(v[:, input_position], dtype=dtype)
        self._target = np.ascontiguousarray(x[:, target_position], dtype=dtype)
        self._charges = np.ascontiguousarray(charges, dtype=dtype)  # [S, N]
        for name, array in (("positions", self._x), ("velocities", self._v), ("targets", self._target), ("charges", self._charges)):
            if not np.all(np.isfinite(array)):
                raise ValueError(f"{name} contain {np.count_nonzero(~np.isfinite(array))} NaN or Inf values; regenerate the dataset")

        self.batch_size = int(batch_size)
        self.n_particles = n_particles
        self.n_systems = n_systems
        self.input_frame = input_frame
        self.target_frame = target_frame
        self.dtype = dtype

    @property
    def budget(self) -> tuple[int, int, int]:
        """Static ``(n_node, n_edge, n_graph)`` of every batch."""
        return graphs.padding_budget(self.batch_size, self.n_particles)

    def __len__(self) -> int:
        """Number of batches per epoch, the last one possibly ragged."""
        return math.ceil(self.n_systems / self.batch_size)

    def __iter__(self) -> Iterator[jraph.GraphsTuple]:
        return self.epoch(None)

    def order(self, key: jax.Array | None) -> np.ndarray:
        """Return the system order of an epoch: a permutation from ``key``, or ``arange`` if None."""
        if key is None:
            return np.arange(self.n_systems)
        return np.asarray(jax.random.permutation(key, self.n_systems))

    def epoch(self, key: jax.Array | None = None) -> Iterator[jraph.GraphsTuple]:
        """Yield the batches of one epoch, shuffled by ``key`` (fixed order if None).

        Each batch is a host-side numpy ``GraphsTuple`` with the static
        budget :attr:`budget`; every system appears exactly once per epoch.
        """
        order = self.order(key)
        for start in range(0, self.n_systems, self.batch_size):
            index = order[start : start + self.batch_size]
            yield graphs.build_graphs(
                self._x[index],
                self._v[index],
                self._charges[index],
                self._target[index],
                batch_size=self.batch_size,
                dtype=self.dtype,
            )
