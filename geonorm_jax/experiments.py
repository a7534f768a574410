"""Figure 2, Figure 5 and Table 1 of the GeoNorm paper as config grids, sweeps and outputs.

The paper is Meng et al., "Towards Geometric Normalization Techniques in SE(3)
Equivariant Graph Neural Networks for Physical Dynamics Simulations" (IJCAI 2024).

Each experiment writes under its output directory:

* ``runs/<run name>/``: one run directory per config (:mod:`geonorm_jax.rundir`);
* its figures (PNG) and tables (Markdown and CSV).

Sizes: ``SIZES["cpu"]`` (the default) shrinks the data, the epochs and some
axes so that each experiment runs in minutes on a 2-core CPU.
``SIZES["full"]`` is the published scale (3,000 training simulations, 1,000
epochs, batch 50, every axis value), meant for a GPU. The axes of the grids
stay those of the paper, with fewer values in the CPU size.

Experiments rerun with the same output directory skip every config whose run
already ended, so an interrupted experiment resumes, and a finished one only
redraws its figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

from geonorm_jax import equivariance, figures, training
from geonorm_jax.config import TrainConfig, make_config
from geonorm_jax.logs import configure_logging
from geonorm_jax.rundir import RunDirectory
from geonorm_jax.sweep import DataCache, RunResult, run_sweep
from geonorm_jax.train import default_run_dir

log = logging.getLogger(__name__)

MODELS: dict[str, dict[str, Any]] = {
    "egnn": {"norm": "none"},
    "layernorm": {"norm": "layernorm"},
    "scalenorm": {"norm": "scalenorm"},
    "geonorm": {"norm": "geonorm"},
    "geonorm-shared": {"norm": "geonorm", "norm_mode": "shared"},
    "geonorm-adaptive": {"norm": "geonorm", "norm_mode": "adaptive"},
    "geonorm-system": {"norm": "geonorm", "sigma": "system"},
}
"""Model variants by name: config overrides of EGNN. The three GeoNorm modes are not in the paper."""

OUR_GEONORM_MODES = ("geonorm-shared", "geonorm-adaptive", "geonorm-system")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Data and training sizes of an experiment, applied to every config of its grid."""

    n_train: int
    n_valid: int
    n_test: int
    batch_size: int
    epochs: int
    eval_every: int
    hidden_dim: int = 64

    def overrides(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Axes:
    """The values of an experiment's grid axes."""

    n_particles: tuple[int, ...]
    num_layers: tuple[int, ...]
    seeds: tuple[int, ...]
    learning_rates: tuple[float, ...]
    models: tuple[str, ...]


# NOTE: the CPU sizes were chosen for 2 CPU cores; see
# experiments/README.md for the measured wall times.
SIZES: dict[str, dict[str, Sizes]] = {
    "cpu": {
        "figure2": Sizes(n_train=100, n_valid=50, n_test=50, batch_size=25, epochs=15, eval_every=5),
        "figure5": Sizes(n_train=100, n_valid=50, n_test=50, batch_size=25, epochs=8, eval_every=4),
        "table1": Sizes(n_train=100, n_valid=50, n_test=100, batch_size=25, epochs=8, eval_every=4),
    },
    "full": {
        name: Sizes(n_train=3000, n_valid=2000, n_test=2000, batch_size=50, epochs=1000, eval_every=5)
        for name in ("figure2", "figure5", "table1")
    },
}

AXES: dict[str, dict[str, Axes]] = {
    "cpu": {
        "figure5": Axes((50,), (3,), (30, 40), (5e-3, 5e-4), ("egnn", "scalenorm", "geonorm", *OUR_GEONORM_MODES)),
        "table1": Axes((50,), (3,), (30, 40), (5e-4,),
                       ("layernorm", "scalenorm", "geonorm", *OUR_GEONORM_MODES)),
    },
    "full": {
        "figure5": Axes((50, 100), (3, 5), (30, 40, 50, 60), (5e-3, 5e-4),
                        ("egnn", "scalenorm", "geonorm", *OUR_GEONORM_MODES)),
        "table1": Axes((50, 100), (3, 5), (30, 40), (5e-4,),
                       ("layernorm", "scalenorm", "geonorm", *OUR_GEONORM_MODES)),
    },
}


def make_grid(
    sizes: Sizes,
    *,
    n_particles: Sequence[int],
    num_layers: Sequence[int],
    seeds: Sequence[int],
    learning_rates: Sequence[float],
    models: Sequence[str],
    **overrides: Any,
) -> list[TrainConfig]:
    """Return the configs of the full product of the axes, in axis order, without repeats.

    Raises:
      ValueError: an unknown model name or an invalid config value.
    """
    unknown = [model for model in models if model not in MODELS]
    if unknown:
        raise ValueError(f"unknown model {unknown}; choose from {', '.join(MODELS)}")
    configs: list[TrainConfig] = []
    for n in n_particles:
        for layers in num_layers:
            for learning_rate in learning_rates:
                for model in models:
                    for seed in seeds:
                        config = make_config(
                            **sizes.overrides(),
                            **MODELS[model],
                            **overrides,
                            n_particles=n,
                            num_layers=layers,
                            learning_rate=learning_rate,
                            seed=seed,
                        )
                        if config not in configs:
                            configs.append(config)
    return configs


def _run_dir_fn(out_dir: Path):
    return lambda config: default_run_dir(config, out_dir / "runs")


def _status_rows(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        config, summary = result.config, result.summary
        rows.append({
            "N": config.n_particles,
            "layers": config.num_layers,
            "lr": config.learning_rate,
            "seed": config.seed,
            "model": figures.model_label(config),
            "status": summary["status"],
            "final train MSE": summary["final_train_mse"],
            "best epoch": summary["best_epoch"],
            "test MSE at best valid": summary["test_mse"],
            "run": result.run_dir.name,
        })
    return rows


STATUS_COLUMNS = ("N", "layers", "lr", "seed", "model", "status", "final train MSE", "best epoch",
                  "test MSE at best valid", "run")


# --- Figure 2 -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Figure2Axes:
    """Figure 2's grid: depths at each N of ``depth_panel_n``, and N values at one depth."""

    depths: tuple[int, ...] = (1, 3, 5, 10)
    depth_panel_n: tuple[int, ...] = (20, 50)
    size_panel_n: tuple[int, ...] = (20, 50, 100)
    size_panel_depth: int = 3
    seeds: tuple[int, ...] = (30,)
    learning_rate: float = 5e-4


def figure2_configs(sizes: Sizes, axes: Figure2Axes, **overrides: Any) -> list[TrainConfig]:
    """Return the vanilla EGNN (no norm) configs of both Figure 2 panels, without repeats."""
    common = dict(seeds=axes.seeds, learning_rates=(axes.learning_rate,), models=("egnn",), **overrides)
    configs = make_grid(sizes, n_particles=axes.depth_panel_n, num_layers=axes.depths, **common)
    for config in make_grid(sizes, n_particles=axes.size_panel_n, num_layers=(axes.size_panel_depth,), **common):
        if config not in configs:
            configs.append(config)
    return configs


def run_figure2(out_dir: str | Path, sizes: Sizes, axes: Figure2Axes = Figure2Axes(), *,
                overrides: dict[str, Any] | None = None, data_root: str | Path = "data",
                progress: bool = True, checkpoints: bool = True) -> dict[str, Path]:
    """Train the Figure 2 grid and draw it: one panel per N over depth, one panel over N.

    Returns the paths of the written files keyed ``figure``, ``table_md``, ``table_csv``.
    """
    out_dir = Path(out_dir)
    configs = figure2_configs(sizes, axes, **(overrides or {}))
    results = run_sweep(configs, _run_dir_fn(out_dir), data_root=data_root, progress=progress,
                        checkpoints=checkpoints)
    by_setting = {(r.config.n_particles, r.config.num_layers, r.config.seed): r for r in results}
    colors = ("tab:blue", "tab:green", "tab:orange", "tab:red", "tab:purple", "tab:brown", "tab:olive")
    seed_styles = ("-", "--", ":", "-.")

    def curve(n, layers, seed, label, color_index, seed_index):
        if len(axes.seeds) > 1:
            label += f", seed {seed}"
        return figures.read_curve(by_setting[(n, layers, seed)].run_dir, label,
                                  color=colors[color_index % len(colors)],
                                  linestyle=seed_styles[seed_index % len(seed_styles)])

    panels = []
    for n in axes.depth_panel_n:
        curves = [
            curve(n, layers, seed, f"{layers} layer" + ("s" if layers > 1 else ""), depth_index, seed_index)
            for depth_index, layers in enumerate(axes.depths)
            for seed_index, seed in enumerate(axes.seeds)
        ]
        panels.append((f"EGNN without norm, N={n} particles, over depth", curves))
    if axes.size_panel_n:
        curves = [
            curve(n, axes.size_panel_depth, seed, f"N={n}", size_index, seed_index)
            for size_index, n in enumerate(axes.size_panel_n)
            for seed_index, seed in enumerate(axes.seeds)
        ]
        panels.append((f"EGNN without norm, {axes.size_panel_depth} layers, over system size N", curves))

    title = (f"Training instability of EGNN without normalization "
             f"(lr {axes.learning_rate:g}, {sizes.n_train} training systems, batch {sizes.batch_size})")
    outputs = {"figure": figures.plot_panels(panels, out_dir / "figure2.png", title, ncols=len(panels))}
    outputs["table_md"], outputs["table_csv"] = figures.write_table(
        _status_rows(results), STATUS_COLUMNS, out_dir / "figure2_runs", title="Figure 2 runs")
    return outputs


# --- Figure 5 -----------------------------------------------------------------------------------


def run_figure5(out_dir: str | Path, sizes: Sizes, axes: Axes, *, overrides: dict[str, Any] | None = None,
                data_root: str | Path = "data", progress: bool = True, checkpoints: bool = True) -> dict[str, Path]:
    """Train the Figure 5 grid; draw one PNG per (N, depth), one panel per (lr, seed).

    Returns the written paths keyed ``figure_N{n}_L{layers}``, ``table_md``, ``table_csv``.
    """
    out_dir = Path(out_dir)
    configs = make_grid(sizes, **dataclasses.asdict(axes), **(overrides or {}))
    results = run_sweep(configs, _run_dir_fn(out_dir), data_root=data_root, progress=progress,
                        checkpoints=checkpoints)
    outputs: dict[str, Path] = {}
    settings = sorted({(r.config.n_particles, r.config.num_layers) for r in results})
    for n, layers in settings:
        in_setting = [r for r in results if (r.config.n_particles, r.config.num_layers) == (n, layers)]
        learning_rates = sorted({r.config.learning_rate for r in in_setting}, reverse=True)
        seeds = sorted({r.config.seed for r in in_setting})
        panels = []
        for learning_rate in learning_rates:
            for seed in seeds:
                curves = []
                for result in in_setting:
                    if (result.config.learning_rate, result.config.seed) != (learning_rate, seed):
                        continue
                    config = result.config
                    is_geonorm = figures.model_color(config) == figures.GEONORM_COLOR
                    curves.append(figures.read_curve(
                        result.run_dir, figures.model_label(config), color=figures.model_color(config),
                        linestyle="-" if config.norm != "geonorm" or is_geonorm else "--",
                        highlight=is_geonorm,
                    ))
                panels.append((f"lr {learning_rate:g}, seed {seed}", curves))
        first = in_setting[0].config
        title = (f"EGNN vs ScaleNorm vs GeoNorm (red): N={n} particles, {layers} layers "
                 f"({first.n_train} training systems, batch {first.batch_size})")
        outputs[f"figure_N{n}_L{layers}"] = figures.plot_panels(
            panels, out_dir / f"figure5_N{n}_L{layers}.png", title, ncols=len(seeds))
    outputs["table_md"], outputs["table_csv"] = figures.write_table(
        _status_rows(results), STATUS_COLUMNS, out_dir / "figure5_runs", title="Figure 5 runs")
    return outputs


# --- Table 1 ------------------------------------------------------------------------------------

RTE_FILE = "rte.json"
RTE_KEY_SEED = 0

TABLE1_COLUMNS = (
    "N", "layers", "seed", "model", "status", "best epoch", "test MSE",
    "rotation mean", "rotation median", "rotation max", "rotation delta",
    "translation mean", "translation median", "translation max", "translation delta",
    "equivariance max",
)


def evaluate_run_rte(result: RunResult, data: DataCache, *, key_seed: int = RTE_KEY_SEED) -> dict[str, Any] | None:
    """Compute (or read back) the RTE metrics of a run's best params on its test set.

    The metrics are cached in the run directory as ``rte.json``. Every run
    draws its transforms from ``PRNGKey(key_seed)``, so models of one N are
    compared on the same rotations and translations.

    Returns:
      The output of :func:`geonorm_jax.equivariance.rte_metrics`, or None
      when the run has no best params (it diverged before its first evaluation).
    """
    directory = RunDirectory(result.run_dir)
    cache_path = directory.path / RTE_FILE
    if cache_path.exists():
        cached = json.loads(cache_path.read_text())
        if cached.get("key_seed") == key_seed:
            return cached["metrics"]
    if not directory.best_params_path.exists():
        return None

    config = result.config
    model = training.build_model(config)
    test_loader = data.loader(config, "test")
    example = next(iter(test_loader.epoch(None)))
    like_params = training.init_params(model, example, jax.random.PRNGKey(0))
    params = directory.load_best_params(like_params)
    metrics = equivariance.rte_metrics(model.apply, params, test_loader.epoch(None), jax.random.PRNGKey(key_seed))
    cache_path.write_text(json.dumps({"key_seed": key_seed, "metrics": metrics}, indent=2) + "\n")
    return metrics


def run_table1(out_dir: str | Path, sizes: Sizes, axes: Axes, *, overrides: dict[str, Any] | None = None,
               data_root: str | Path = "data", progress: bool = True, checkpoints: bool = True) -> dict[str, Path]:
    """Train the Table 1 grid, then tabulate the RTE of each run's best params on the test set.

    Returns the written paths keyed ``table_md`` and ``table_csv``.
    """
    out_dir = Path(out_dir)
    configs = make_grid(sizes, **dataclasses.asdict(axes), **(overrides or {}))
    results = run_sweep(configs, _run_dir_fn(out_dir), data_root=data_root, progress=progress,
                        checkpoints=checkpoints)
    data = DataCache(data_root, progress=progress)
    model_order = {name: index for index, name in enumerate(MODELS)}
    rows = []
    for result in results:
        config, summary = result.config, result.summary
        metrics = evaluate_run_rte(result, data)
        row = {
            "N": config.n_particles,
            "layers": config.num_layers,
            "seed": config.seed,
            "model": figures.model_label(config),
            "status": summary["status"],
            "best epoch": summary["best_epoch"],
            "_order": model_order[_model_name(config)],
        }
        if metrics is not None:
            row["test MSE"] = metrics["untransformed"]["mean"]
            for kind in ("rotation", "translation"):
                for statistic in ("mean", "median", "max", "delta"):
                    row[f"{kind} {statistic}"] = metrics[kind][statistic]
            row["equivariance max"] = metrics["equivariance_max"]
        rows.append(row)
        log.info("RTE of %s: %s", result.run_dir.name, "none (no best params)" if metrics is None else
                 f"rotation delta {row['rotation delta']:.3g}, translation delta {row['translation delta']:.3g}")
    rows.sort(key=lambda row: (row["N"], row["layers"], row["seed"], row["_order"]))
    first = results[0].config
    title = (f"Table 1: test MSE under random rotations and translations "
             f"({first.n_test} test systems, {first.epochs} epochs)")
    outputs = {}
    outputs["table_md"], outputs["table_csv"] = figures.write_table(rows, TABLE1_COLUMNS, out_dir / "table1",
                                                                     title=title)
    return outputs


def _model_name(config: TrainConfig) -> str:
    for name, overrides in MODELS.items():
        candidate = dataclasses.replace(config, **{"norm_mode": "particle", "sigma": "particle", **overrides})
        if candidate == config:
            return name
    raise ValueError(f"config matches no model of MODELS: {config}")


# --- Command line -------------------------------------------------------------------------------


def int_list(text: str) -> tuple[int, ...]:
    """Parse a comma-separated list of integers, e.g. ``"30,40"`` (an argparse type)."""
    try:
        return tuple(int(item) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 30,40, got {text!r}") from None


def float_list(text: str) -> tuple[float, ...]:
    """Parse a comma-separated list of numbers, e.g. ``"5e-3,5e-4"`` (an argparse type)."""
    try:
        return tuple(float(item) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 5e-3,5e-4, got {text!r}") from None


def name_list(text: str) -> tuple[str, ...]:
    """Parse a comma-separated list of names (an argparse type)."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def build_parser(name: str, description: str) -> argparse.ArgumentParser:
    """Return the command-line parser shared by the experiment scripts."""
    parser = argparse.ArgumentParser(prog=f"python experiments/{name}.py", description=description)
    parser.add_argument("--out", type=Path, default=Path("experiments/out") / name,
                        help=f"output directory (default: experiments/out/{name})")
    parser.add_argument("--data-root", type=Path, default=Path("data"),
                        help="directory of the generated datasets (default: data)")
    parser.add_argument("--full", action="store_true",
                        help="the paper's scale: 3,000 training simulations, 1,000 epochs, batch 50, "
                             "every axis value (hours on a GPU)")
    sizes = parser.add_argument_group("sizes (default: the CPU size, or the paper's with --full)")
    sizes.add_argument("--n-train", type=int, help="training simulations")
    sizes.add_argument("--n-valid", type=int, help="validation simulations")
    sizes.add_argument("--n-test", type=int, help="test simulations")
    sizes.add_argument("--batch-size", type=int, help="systems per batch")
    sizes.add_argument("--epochs", type=int, help="training epochs")
    sizes.add_argument("--eval-every", type=int, help="epochs between evaluations")
    sizes.add_argument("--hidden", dest="hidden_dim", type=int, help="hidden feature size")
    sizes.add_argument("--divergence-bound", type=float,
                       help="a training MSE above this marks a run diverged (default 1e4)")
    parser.add_argument("--no-checkpoints", action="store_true",
                        help="skip orbax checkpoints (faster; an interrupted run then restarts)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def add_axis_arguments(parser: argparse.ArgumentParser, axes: Axes) -> None:
    """Add the grid axes of Figure 5 and Table 1 as comma-separated list flags."""
    group = parser.add_argument_group("grid axes (comma-separated lists)")
    group.add_argument("--n-particles", type=int_list, help=f"system sizes N (CPU default {_join(axes.n_particles)})")
    group.add_argument("--layers", type=int_list, help=f"EGNN depths (CPU default {_join(axes.num_layers)})")
    group.add_argument("--seeds", type=int_list, help=f"seeds (CPU default {_join(axes.seeds)})")
    group.add_argument("--lr", type=float_list, help=f"learning rates (CPU default {_join(axes.learning_rates)})")
    group.add_argument("--models", type=name_list,
                       help=f"models among {', '.join(MODELS)} (default {_join(axes.models)})")


def _join(values) -> str:
    return ",".join(f"{value:g}" if isinstance(value, float) else str(value) for value in values)


def sizes_from_args(name: str, args: argparse.Namespace) -> Sizes:
    """Return the experiment's sizes (CPU or full) with the size flags applied."""
    sizes = SIZES["full" if args.full else "cpu"][name]
    flags = {field.name: getattr(args, field.name, None) for field in dataclasses.fields(Sizes)}
    return dataclasses.replace(sizes, **{key: value for key, value in flags.items() if value is not None})


def axes_from_args(name: str, args: argparse.Namespace) -> Axes:
    """Return the experiment's grid axes (CPU or full) with the axis flags applied."""
    axes = AXES["full" if args.full else "cpu"][name]
    flags = {
        "n_particles": args.n_particles,
        "num_layers": args.layers,
        "seeds": args.seeds,
        "learning_rates": args.lr,
        "models": args.models,
    }
    return dataclasses.replace(axes, **{key: value for key, value in flags.items() if value is not None})


def extra_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Return config overrides of flags that are not sizes or axes."""
    return {"divergence_bound": args.divergence_bound} if args.divergence_bound is not None else {}


def run_script(parser: argparse.ArgumentParser, run: Callable[[], dict[str, Path]]) -> int:
    """Run an experiment for a script and print its outputs; return the exit code.

    An invalid value (``ValueError``) becomes a usage error (exit 2), and
    Ctrl-C or SIGTERM exit 130 after the runs saved their state.
    """
    configure_script()
    try:
        outputs = run()
    except ValueError as error:
        parser.error(str(error))
    except KeyboardInterrupt:
        print("Interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    for name, path in outputs.items():
        print(f"{name}: {path}")
    return 0


def run_grid_script(name: str, argv: Sequence[str] | None, description: str) -> int:
    """Parse the flags of Figure 5 or Table 1 and run it; return the exit code."""
    run = {"figure5": run_figure5, "table1": run_table1}[name]
    parser = build_parser(name, description)
    add_axis_arguments(parser, AXES["cpu"][name])
    args = parser.parse_args(argv)
    return run_script(
        parser,
        lambda: run(
            args.out,
            sizes_from_args(name, args),
            axes_from_args(name, args),
            overrides=extra_overrides(args),
            data_root=args.data_root,
            progress=not args.no_progress,
            checkpoints=not args.no_checkpoints,
        ),
    )


def configure_script() -> None:
    """Set up INFO logging, and make SIGTERM stop a script like Ctrl-C, with resumable summaries."""
    configure_logging()
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
