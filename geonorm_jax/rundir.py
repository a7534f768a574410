"""A training run's directory: config, metrics, checkpoints, best params, summary.

Layout of ``run_dir``:

* ``config.json``: the resolved :class:`~geonorm_jax.config.TrainConfig`.
* ``metrics.jsonl``: one JSON record per finished epoch (``epoch``,
  ``train_mse``, ``grad_norm``, ``wall_time`` in seconds since the run
  started, and ``valid_mse``/``test_mse`` on evaluation epochs, else null).
  Non-finite values are written as null.
* ``checkpoints/``: orbax-checkpoint steps named by epoch, each with the
  params, optimizer state and PRNG key, plus the metrics so far as JSON.
* ``best_params.msgpack``: the params with the best validation MSE
  (``flax.serialization`` bytes).
* ``summary.json``: status (``finished``, ``diverged at epoch k`` or
  ``interrupted at epoch k``) and the final figures.
* ``loss_curves.png``: train/valid/test MSE per epoch, log scale.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import orbax.checkpoint as ocp

from geonorm_jax.config import TrainConfig

log = logging.getLogger(__name__)


class RunDirectoryError(ValueError):
    """A run directory that cannot be used for the requested run."""


class RunDirectory:
    """Reads and writes one run directory; see the module docstring for its files."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config_path = self.path / "config.json"
        self.metrics_path = self.path / "metrics.jsonl"
        self.summary_path = self.path / "summary.json"
        self.best_params_path = self.path / "best_params.msgpack"
        self.plot_path = self.path / "loss_curves.png"
        self.checkpoint_path = self.path / "checkpoints"

    # -- config ---------------------------------------------------------------

    def prepare(self, config: TrainConfig, *, resume: bool, overwrite: bool) -> str:
        """Create or reuse the directory for ``config``.

        Returns ``"new"`` for a fresh run, ``"resume"`` when a checkpoint of
        the same config should be continued, and ``"done"`` when the
        same config already finished and nothing needs to run.

        Raises:
          RunDirectoryError: the directory contains a run of a different config,
            or an unfinished run of this config, and neither ``overwrite``
            nor ``resume`` was requested.
        """
        if overwrite and resume:
            raise RunDirectoryError("--resume and --overwrite exclude each other; choose one")
        stored = self.read_config() if self.config_path.exists() else None

        if stored is not None and overwrite:
            log.info("Overwriting the run in %s", self.path)
            shutil.rmtree(self.path)
            stored = None
        if stored is not None and stored != config:
            raise RunDirectoryError(_config_mismatch_message(self.path, stored, config))

        if stored is not None and self.has_outputs():
            summary = self.read_summary()
            if summary is not None and is_complete(summary):
                return "done"
            if not resume:
                raise RunDirectoryError(
                    f"{self.path} contains an unfinished run of this config; pass --resume to "
                    "continue it or --overwrite to start over"
                )
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.config_path, config.to_json() + "\n")
        if resume and self.latest_checkpoint() is not None:
            return "resume"
        if resume:
            log.warning("No checkpoint to resume in %s; starting from epoch 0", self.path)
        return "new"

    def read_config(self) -> TrainConfig:
        try:
            values = json.loads(self.config_path.read_text())
            return TrainConfig.from_dict(values)
        except (json.JSONDecodeError, TypeError, ValueError) as error:
            raise RunDirectoryError(
                f"{self.config_path} is not a valid run config ({error}); "
                "delete the directory or pass --overwrite"
            ) from error

    def has_outputs(self) -> bool:
        return self.metrics_path.exists() or self.checkpoint_path.exists()

    # -- metrics --------------------------------------------------------------

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as stream:
            stream.write(json.dumps(_finite_or_none(record)) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]

    def write_metrics(self, records: list[dict[str, Any]]) -> None:
        """Replace the metrics file, e.g. to drop epochs after a resumed checkpoint."""
        text = "".join(json.dumps(_finite_or_none(record)) + "\n" for record in records)
        _atomic_write_text(self.metrics_path, text)

    # -- checkpoints ----------------------------------------------------------

    def _manager(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
        return ocp.CheckpointManager(self.checkpoint_path.resolve(), options=options)

    def save_checkpoint(self, epoch: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Save ``state`` (a pytree of arrays) and ``meta`` (JSON) as step ``epoch``."""
        with self._manager() as manager:
            manager.save(
                epoch,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    meta=ocp.args.JsonSave(_finite_or_none(meta)),
                ),
                force=True,
            )

    def latest_checkpoint(self) -> int | None:
        if not self.checkpoint_path.exists():
            return None
        with self._manager() as manager:
            return manager.latest_step()

    def restore_checkpoint(self, like_state: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, Any]]:
        """Return ``(epoch, state, meta)`` of the latest checkpoint.

        ``like_state`` gives the pytree structure, shapes and dtypes to restore into.
        """
        with self._manager() as manager:
            epoch = manager.latest_step()
            if epoch is None:
                raise RunDirectoryError(f"no checkpoint in {self.checkpoint_path} to resume from")
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
            restored = manager.restore(
                epoch,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        return epoch, restored.state, restored.meta

    # -- params and summary ---------------------------------------------------

    def save_best_params(self, params: Any) -> None:
        _atomic_write_bytes(self.best_params_path, flax.serialization.to_bytes(params))

    def load_best_params(self, like_params: Any) -> Any:
        return flax.serialization.from_bytes(like_params, self.best_params_path.read_bytes())

    def write_summary(self, summary: dict[str, Any]) -> None:
        _atomic_write_text(self.summary_path, json.dumps(_finite_or_none(summary), indent=2) + "\n")

    def read_summary(self) -> dict[str, Any] | None:
        if not self.summary_path.exists():
            return None
        return json.loads(self.summary_path.read_text())


def is_complete(summary: dict[str, Any]) -> bool:
    """Return whether a run summary's status is final (finished or diverged)."""
    status = summary.get("status", "")
    return status == "finished" or status.startswith("diverged")


def _config_mismatch_message(path: Path, stored: TrainConfig, requested: TrainConfig) -> str:
    differences = {
        name: (value, getattr(requested, name))
        for name, value in stored.to_dict().items()
        if getattr(requested, name) != value
    }
    listing = ", ".join(f"{name}: stored {old!r}, requested {new!r}" for name, (old, new) in differences.items())
    message = f"{path} contains a run with a different config ({listing})."
    per_particle = stored.norm in ("layernorm", "scalenorm") or (
        stored.norm == "geonorm" and stored.norm_mode == "particle"
    )
    if "n_particles" in differences and per_particle:
        message += (
            f" Its per-particle {stored.norm} parameters g_i, b_i exist for exactly "
            f"N={stored.n_particles} particles and cannot serve N={requested.n_particles}."
        )
    return message + " Choose another --run-dir, or pass --overwrite to replace it."


def _finite_or_none(value: Any) -> Any:
    """Replace NaN and Inf by None, recursively, so the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode())


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a killed run never leaves half a file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)
