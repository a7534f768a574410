"""Training configuration: one frozen dataclass with the knobs of the experiments.

Presets:

* ``default``: what ``make train`` runs. Sized so that N=50 trains in about
  ten minutes on two CPU cores (an estimate from the benchmark page) and
  clearly beats the constant-velocity baseline.
* ``paper``: the published setting (3,000 / 2,000 / 2,000 simulations,
  batch 50, 1,000 epochs, evaluation every 5 epochs). Hours on a GPU.
* ``tiny``: a few dozen simulations and a few epochs, for tests and smoke runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from geonorm_jax.dataset import DatasetConfig
from geonorm_jax.egnn import NORMS
from geonorm_jax.egnn import PLACEMENTS as NORM_PLACEMENTS
from geonorm_jax.norms import MODES as NORM_MODES
from geonorm_jax.norms import SCALENORM_KINDS, SIGMAS


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run's results.

    Two runs with equal configs produce the same metrics on the same machine;
    the run directory stores this config and refuses to mix runs.
    """

    # Data: the charged N-body system.
    n_particles: int = 50
    data_seed: int = 43
    n_train: int = 1000
    n_valid: int = 500
    n_test: int = 500
    input_frame: int = 30
    target_frame: int = 40

    # Model: EGNN (velocity variant) and its coordinate normalization.
    num_layers: int = 4
    hidden_dim: int = 64
    norm: str = "geonorm"
    norm_mode: str = "particle"
    sigma: str = "particle"
    scalenorm_kind: str = "l2"
    norm_placement: str = "between"
    norm_diff: bool = False
    coords_tanh: bool = False
    h_layernorm: bool = False

    # Optimization: Adam with L2 weight decay added to the gradient, as
    # torch.optim.Adam(weight_decay=...) does.
    learning_rate: float = 5e-4
    weight_decay: float = 1e-12
    batch_size: int = 50
    epochs: int = 40
    eval_every: int = 5
    seed: int = 30

    # A training loss above this (or NaN/Inf) stops the run as diverged.
    divergence_bound: float = 1e4

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field and how to fix it."""
        _check_choice("norm", self.norm, NORMS)
        _check_choice("norm_mode", self.norm_mode, NORM_MODES)
        _check_choice("sigma", self.sigma, SIGMAS)
        _check_choice("scalenorm_kind", self.scalenorm_kind, SCALENORM_KINDS)
        _check_choice("norm_placement", self.norm_placement, NORM_PLACEMENTS)
        if self.n_particles < 2:
            raise ValueError(
                f"n_particles must be at least 2 (a system needs neighbours), got {self.n_particles}"
            )
        for name in ("n_train", "n_valid", "n_test", "batch_size", "epochs", "eval_every",
                     "num_layers", "hidden_dim"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        for name in ("learning_rate", "divergence_bound"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        for name in ("input_frame", "target_frame"):
            value = getattr(self, name)
            if not 0 <= value <= 48:
                raise ValueError(f"{name} must be a saved frame index in 0..48, got {value}")
        if self.target_frame <= self.input_frame:
            raise ValueError(
                f"target_frame ({self.target_frame}) must come after input_frame ({self.input_frame})"
            )

    def dataset_config(self) -> DatasetConfig:
        """Return the config of the dataset this run trains on (input and target frames only)."""
        return DatasetConfig(
            n_particles=self.n_particles,
            seed=self.data_seed,
            n_train=self.n_train,
            n_valid=self.n_valid,
            n_test=self.n_test,
            frames=(self.input_frame, self.target_frame),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build a config from a dict, rejecting unknown keys by name."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys are {sorted(known)}")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {
        "n_train": 3000,
        "n_valid": 2000,
        "n_test": 2000,
        "batch_size": 50,
        "epochs": 1000,
        "eval_every": 5,
    },
    "tiny": {
        "n_particles": 5,
        "n_train": 40,
        "n_valid": 20,
        "n_test": 20,
        "batch_size": 16,
        "epochs": 4,
        "eval_every": 2,
        "num_layers": 2,
        "hidden_dim": 16,
    },
}


def make_config(preset: str = "default", **overrides: Any) -> TrainConfig:
    """Return the preset's config with ``overrides`` applied and validated.

    Overrides equal to None are ignored, so command-line flags that were not
    given fall back to the preset.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    values = dict(PRESETS[preset])
    values.update({name: value for name, value in overrides.items() if value is not None})
    config = TrainConfig.from_dict(values)
    config.validate()
    return config


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
