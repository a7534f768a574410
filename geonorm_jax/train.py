"""Train EGNN on the charged N-body system and report the test MSE.

``python -m geonorm_jax.train --n-particles 50`` (or ``make train N=50``)
generates or reuses the dataset, trains with checkpoints in a run directory,
and prints the test MSE at the evaluation with the best validation MSE.
The run directory's files are described in :mod:`geonorm_jax.rundir`.

Exit codes: 0 finished, 2 invalid arguments, 3 diverged, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from geonorm_jax import training
from geonorm_jax.config import (
    NORM_MODES,
    NORM_PLACEMENTS,
    NORMS,
    PRESETS,
    SCALENORM_KINDS,
    SIGMAS,
    TrainConfig,
    make_config,
)
from geonorm_jax.dataset import load_or_generate
from geonorm_jax.loader import GraphLoader
from geonorm_jax.logs import configure_logging
from geonorm_jax.plots import plot_loss_curves
from geonorm_jax.rundir import RunDirectory, RunDirectoryError
from geonorm_jax.simulation import DEFAULT_PARAMS

log = logging.getLogger(__name__)

EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


def default_run_dir(config: TrainConfig, root: str | Path = "runs") -> Path:
    """Return ``root/<name>`` with a name made of the knobs users sweep."""
    norm = config.norm
    if config.norm == "geonorm":
        norm += f"-{config.norm_mode}-sigma_{config.sigma}"
    elif config.norm == "scalenorm":
        norm += f"-{config.scalenorm_kind}"
    name = (
        f"N{config.n_particles}_{norm}_L{config.num_layers}_H{config.hidden_dim}"
        f"_lr{config.learning_rate:g}_B{config.batch_size}_seed{config.seed}"
    )
    return Path(root) / name


def baseline_mse(split, frames: Sequence[int], config: TrainConfig) -> dict[str, float]:
    """Return the test MSE of two physics-free predictors of the target positions.

    ``no_motion`` predicts x(T); ``constant_velocity`` predicts
    x(T) + v(T) * dT with dT the time between the two frames.
    """
    input_index = frames.index(config.input_frame)
    target_index = frames.index(config.target_frame)
    x = split.x[:, input_index]  # [S, N, 3]
    v = split.v[:, input_index]
    target = split.x[:, target_index]
    frame_interval = DEFAULT_PARAMS.sample_every * DEFAULT_PARAMS.dt
    delta_t = (config.target_frame - config.input_frame) * frame_interval
    return {
        "no_motion": float(np.mean((x - target) ** 2)),
        "constant_velocity": float(np.mean((x + v * delta_t - target) ** 2)),
    }


def run_training(
    config: TrainConfig,
    run_dir: str | Path | None = None,
    *,
    data_root: str | Path = "data",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``config`` in ``run_dir`` and return the run's summary.

    A run stops early, with status ``diverged at epoch k``, when an epoch's
    training loss is NaN, Inf or above ``config.divergence_bound``. The
    directory then keeps every output up to that epoch. A
    ``KeyboardInterrupt`` (or SIGTERM under :func:`main`) saves a checkpoint
    of the last finished epoch before it propagates.

    Raises:
      ValueError: an invalid config, or a run directory that contains another
        config (a :class:`~geonorm_jax.rundir.RunDirectoryError`).
    """
    config.validate()
    directory = RunDirectory(run_dir if run_dir is not None else default_run_dir(config))
    mode = directory.prepare(config, resume=resume, overwrite=overwrite)
    if mode == "done":
        summary = directory.read_summary()
        log.info("%s already ended (%s); pass --overwrite to train again", directory.path, summary["status"])
        return summary

    dataset = load_or_generate(config.dataset_config(), root=data_root, progress=progress)
    loaders = {
        name: GraphLoader(
            dataset.splits[name],
            dataset.frames,
            config.batch_size,
            input_frame=config.input_frame,
            target_frame=config.target_frame,
        )
        for name in ("train", "valid", "test")
    }
    baselines = baseline_mse(dataset.splits["test"], dataset.frames, config)
    log.info(
        "Test MSE of baselines at N=%d: no motion %.4f, constant velocity %.4f",
        config.n_particles,
        baselines["no_motion"],
        baselines["constant_velocity"],
    )

    model = training.build_model(config)
    optimizer = training.make_optimizer(config)
    init_key, shuffle_key = jax.random.split(jax.random.PRNGKey(config.seed))
    example = next(iter(loaders["train"].epoch(None)))
    params = training.init_params(model, example, init_key)
    state = {
        "params": params,
        "opt_state": optimizer.init(params),
        "best_params": _copy(params),
        "shuffle_key": shuffle_key,
    }
    meta: dict[str, Any] = {"best_valid_mse": math.inf, "best_test_mse": None, "best_epoch": None}
    metrics: list[dict[str, Any]] = []
    start_epoch = 0
    elapsed_before = 0.0
    if mode == "resume":
        start_epoch, state, meta = directory.restore_checkpoint(state)
        metrics = [record for record in meta.pop("metrics") if record["epoch"] <= start_epoch]
        meta["best_valid_mse"] = _none_to_inf(meta["best_valid_mse"])
        elapsed_before = metrics[-1]["wall_time"] if metrics else 0.0
        log.info("Resuming %s from epoch %d", directory.path, start_epoch)
    directory.write_metrics(metrics)

    train_step = training.jit_train_step(training.make_train_step(model, optimizer))
    eval_step = training.make_eval_step(model)
    status = "finished"
    started = time.perf_counter() - elapsed_before
    last_checkpoint = start_epoch
    epoch = start_epoch

    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            epoch_key = jax.random.fold_in(state["shuffle_key"], epoch)
            batches = loaders["train"].epoch(epoch_key)
            params, opt_state, train_mse, grad_norm = _train_epoch(
                train_step, state["params"], state["opt_state"], batches, len(loaders["train"]),
                epoch, config, progress,
            )
            state["params"], state["opt_state"] = params, opt_state
            record = {
                "epoch": epoch,
                "train_mse": train_mse,
                "grad_norm": grad_norm,
                "valid_mse": None,
                "test_mse": None,
                "wall_time": time.perf_counter() - started,
            }

            if not (math.isfinite(train_mse) and train_mse <= config.divergence_bound):
                status = f"diverged at epoch {epoch}"
                log.warning("Training loss %s at epoch %d: %s", train_mse, epoch, status)
                metrics.append(record)
                directory.append_metrics(record)
                break

            if epoch % config.eval_every == 0 or epoch == config.epochs:
                record["valid_mse"] = training.evaluate(eval_step, params, loaders["valid"].epoch(None))
                record["test_mse"] = training.evaluate(eval_step, params, loaders["test"].epoch(None))
                if record["valid_mse"] < meta["best_valid_mse"]:
                    meta.update(
                        best_valid_mse=record["valid_mse"],
                        best_test_mse=record["test_mse"],
                        best_epoch=epoch,
                    )
                    state["best_params"] = _copy(params)
                    directory.save_best_params(state["best_params"])
                log.info(
                    "epoch %d: train %.5f, valid %.5f, test %.5f (best valid %.5f at epoch %s)",
                    epoch, train_mse, record["valid_mse"], record["test_mse"],
                    meta["best_valid_mse"], meta["best_epoch"],
                )

            metrics.append(record)
            directory.append_metrics(record)
            if record["valid_mse"] is not None:
                directory.save_checkpoint(epoch, state, {**meta, "metrics": metrics})
                last_checkpoint = epoch
    except KeyboardInterrupt:
        finished_epoch = metrics[-1]["epoch"] if metrics else start_epoch
        if finished_epoch > last_checkpoint and finished_epoch == epoch:
            # The interrupted epoch already finished its step; params match its metrics.
            directory.save_checkpoint(finished_epoch, state, {**meta, "metrics": metrics})
        elif finished_epoch > last_checkpoint:
            log.warning(
                "Interrupted inside epoch %d; resuming restarts from the checkpoint of epoch %d",
                epoch, last_checkpoint,
            )
        status = f"interrupted at epoch {finished_epoch}"
        _finish(directory, config, metrics, meta, baselines, status, started)
        raise

    return _finish(directory, config, metrics, meta, baselines, status, started)


def _train_epoch(train_step, params, opt_state, batches, num_batches, epoch, config, progress):
    """Run one epoch; return params, opt_state, the epoch's MSE and mean gradient norm.

    Each step's loss is read one step late, so the host builds the next batch
    while the device runs the current step. A non-finite or too large loss
    ends the epoch at once, because every later step would be wasted.
    """
    total_loss = 0.0
    total_graphs = 0.0
    grad_norms = []
    pending = None
    bar = tqdm(total=num_batches, desc=f"epoch {epoch}", leave=False, disable=not progress, unit="batch")

    def consume(metrics):
        nonlocal total_loss, total_graphs
        loss, grad_norm, num_graphs = (float(value) for value in metrics)
        total_loss += loss * num_graphs
        total_graphs += num_graphs
        grad_norms.append(grad_norm)
        bar.update(1)
        bar.set_postfix(loss=f"{total_loss / max(total_graphs, 1):.5f}")
        return math.isfinite(loss) and loss <= config.divergence_bound

    healthy = True
    for graph in batches:
        params, opt_state, step_metrics = train_step(params, opt_state, graph)
        if pending is not None and not consume(pending):
            healthy = False
            pending = None
            break
        pending = step_metrics
    if pending is not None:
        healthy = consume(pending)
    bar.close()

    epoch_mse = total_loss / max(total_graphs, 1) if healthy else float("nan")
    mean_grad_norm = float(np.mean(grad_norms)) if grad_norms else float("nan")
    return params, opt_state, epoch_mse, mean_grad_norm


def _finish(directory, config, metrics, meta, baselines, status, started) -> dict[str, Any]:
    """Write the summary and the loss-curve plot; return the summary."""
    best_valid = meta["best_valid_mse"]
    summary = {
        "status": status,
        "epochs_completed": metrics[-1]["epoch"] if metrics else 0,
        "best_epoch": meta["best_epoch"],
        "best_valid_mse": best_valid if math.isfinite(best_valid) else None,
        "test_mse": meta["best_test_mse"],
        "final_train_mse": metrics[-1]["train_mse"] if metrics else None,
        "baseline_test_mse": baselines,
        "wall_time": time.perf_counter() - started,
        "run_dir": str(directory.path),
    }
    directory.write_summary(summary)
    title = (
        f"EGNN + {config.norm}, N={config.n_particles}, {config.num_layers} layers, "
        f"lr {config.learning_rate:g}, seed {config.seed}\n{status}"
    )
    plot_loss_curves(directory.read_metrics(), directory.plot_path, title)
    return summary


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def _none_to_inf(value):
    return math.inf if value is None else value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m geonorm_jax.train",
        description="Train EGNN with a coordinate normalization on the charged N-body system.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS),
                        help="base config; flags given below override it")
    data = parser.add_argument_group("data")
    data.add_argument("--n-particles", "-N", type=int, help="particles per system")
    data.add_argument("--data-seed", type=int, help="seed of the simulated dataset")
    data.add_argument("--n-train", type=int, help="training simulations")
    data.add_argument("--n-valid", type=int, help="validation simulations")
    data.add_argument("--n-test", type=int, help="test simulations")
    data.add_argument("--input-frame", type=int, help="saved frame (0..48) used as input")
    data.add_argument("--target-frame", type=int, help="saved frame (0..48) to predict")
    data.add_argument("--data-root", default="data", help="directory of generated datasets")

    model = parser.add_argument_group("model")
    model.add_argument("--layers", dest="num_layers", type=int, help="EGNN layers")
    model.add_argument("--hidden", dest="hidden_dim", type=int, help="hidden feature size")
    model.add_argument("--norm", choices=NORMS, help="coordinate normalization")
    model.add_argument("--norm-mode", choices=NORM_MODES,
                       help="GeoNorm g, b: per particle (fixed N), shared, or computed from h")
    model.add_argument("--sigma", choices=SIGMAS,
                       help="GeoNorm scale: distance per particle, or RMS per system")
    model.add_argument("--scalenorm-kind", choices=SCALENORM_KINDS, help="ScaleNorm vector norm")
    model.add_argument("--norm-placement", choices=NORM_PLACEMENTS,
                       help="norm after every layer but the last, or after every layer")
    model.add_argument("--norm-diff", action="store_true", default=None,
                       help="use (x_i - x_j)/(|x_i - x_j| + 1) in the coordinate update")
    model.add_argument("--coords-tanh", action="store_true", default=None, help="tanh after phi_x")
    model.add_argument("--h-layernorm", action="store_true", default=None,
                       help="LayerNorm on the invariant features h")

    optim = parser.add_argument_group("optimization")
    optim.add_argument("--lr", dest="learning_rate", type=float, help="Adam learning rate")
    optim.add_argument("--weight-decay", type=float, help="L2 weight decay added to the gradient")
    optim.add_argument("--batch-size", type=int, help="systems per batch")
    optim.add_argument("--epochs", type=int, help="training epochs")
    optim.add_argument("--eval-every", type=int, help="epochs between evaluations and checkpoints")
    optim.add_argument("--seed", type=int, help="seed of the initialization and the shuffling")
    optim.add_argument("--divergence-bound", type=float,
                       help="a training MSE above this stops the run as diverged")

    run = parser.add_argument_group("run directory")
    run.add_argument("--run-dir", help="output directory (default: runs/<config name>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    run.add_argument("--overwrite", action="store_true", help="delete the run in --run-dir first")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


CONFIG_FLAGS = (
    "n_particles", "data_seed", "n_train", "n_valid", "n_test", "input_frame", "target_frame",
    "num_layers", "hidden_dim", "norm", "norm_mode", "sigma", "scalenorm_kind", "norm_placement",
    "norm_diff", "coords_tanh", "h_layernorm", "learning_rate", "weight_decay", "batch_size",
    "epochs", "eval_every", "seed", "divergence_bound",
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging()
    try:
        config = make_config(args.preset, **{name: getattr(args, name) for name in CONFIG_FLAGS})
    except ValueError as error:
        parser.error(str(error))
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)

    try:
        summary = run_training(
            config,
            args.run_dir,
            data_root=args.data_root,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except RunDirectoryError as error:
        parser.error(str(error))
    except KeyboardInterrupt:
        print("Interrupted; continue with --resume and the same flags.", file=sys.stderr)
        return EXIT_INTERRUPTED

    _print_summary(summary, config)
    return EXIT_DIVERGED if summary["status"].startswith("diverged") else 0


def _print_summary(summary: dict[str, Any], config: TrainConfig) -> None:
    baselines = summary["baseline_test_mse"]
    print(f"Run directory: {summary['run_dir']}")
    print(f"Status: {summary['status']} ({summary['epochs_completed']} of {config.epochs} epochs)")
    if summary["test_mse"] is not None:
        print(
            f"Test MSE: {summary['test_mse']:.5f} at epoch {summary['best_epoch']} "
            f"(best validation MSE {summary['best_valid_mse']:.5f})"
        )
    else:
        print("Test MSE: none (no evaluation finished)")
    print(
        f"Baselines at N={config.n_particles}: constant velocity {baselines['constant_velocity']:.5f}, "
        f"no motion {baselines['no_motion']:.5f}"
    )


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
