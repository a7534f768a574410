"""Train several seeds of one configuration in one compiled step, and run sweeps.

:func:`train_seed_group` trains configs that differ only in ``seed`` together:
parameters and optimizer states are stacked along a leading seed axis and the
training step of :mod:`geonorm_jax.training` is ``jax.vmap``-ed over them.
Each seed keeps everything a separate run of :func:`geonorm_jax.train.run_training`
would have:

* its own initialization and its own shuffle order. Every step stacks one
  batch per seed (``[S, ...]`` node and edge features) and vmaps over them,
  so a seed trains on exactly the batches of its separate run;
* its own run directory in the format of :mod:`geonorm_jax.rundir`, with
  checkpoints that ``python -m geonorm_jax.train --resume`` can continue;
* its own divergence: a NaN, Inf or above-bound training loss ends that seed
  with ``diverged at epoch k`` while the other seeds go on. The diverged seed
  is dropped from the stack, which recompiles the step once for the smaller
  seed axis.

The results match separate runs up to float32 rounding, because a vmapped
matrix product may sum in another order than the unbatched one.

:func:`run_sweep` takes a list of configs, skips those whose run directory
already ended (finished or diverged), groups the rest by everything but the
seed and trains each group with :func:`train_seed_group`. An interrupted
sweep therefore resumes where it stopped when it is started again.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import jraph
import numpy as np
from tqdm import tqdm

from geonorm_jax import graphs, training
from geonorm_jax.config import TrainConfig
from geonorm_jax.dataset import DatasetConfig, load_or_generate
from geonorm_jax.loader import GraphLoader
from geonorm_jax.plots import plot_loss_curves
from geonorm_jax.rundir import RunDirectory, RunDirectoryError, is_complete
from geonorm_jax.train import baseline_mse, default_run_dir

log = logging.getLogger(__name__)

RunDirFn = Callable[[TrainConfig], Path]


@dataclasses.dataclass
class RunResult:
    """One config of a sweep: where it ran and its summary (``summary.json``)."""

    config: TrainConfig
    run_dir: Path
    summary: dict[str, Any]


def seed_group_key(config: TrainConfig) -> tuple:
    """Return a hashable key equal for configs that differ only in ``seed``."""
    return tuple(sorted((name, value) for name, value in config.to_dict().items() if name != "seed"))


def group_by_seed(configs: Iterable[TrainConfig]) -> list[list[TrainConfig]]:
    """Group configs that differ only in ``seed``, keeping first-appearance order.

    Raises:
      ValueError: a config appears twice (same seed in one group).
    """
    groups: dict[tuple, list[TrainConfig]] = {}
    for config in configs:
        group = groups.setdefault(seed_group_key(config), [])
        if any(member.seed == config.seed for member in group):
            raise ValueError(f"config with seed {config.seed} appears twice in the sweep: {config}")
        group.append(config)
    return list(groups.values())


class DataCache:
    """Datasets and loaders shared by the groups of a sweep, each loaded once."""

    def __init__(self, data_root: str | Path, *, progress: bool = True):
        self.data_root = Path(data_root)
        self.progress = progress
        self._datasets: dict[DatasetConfig, Any] = {}

    def dataset(self, config: TrainConfig):
        dataset_config = config.dataset_config()
        if dataset_config not in self._datasets:
            self._datasets[dataset_config] = load_or_generate(
                dataset_config, root=self.data_root, progress=self.progress
            )
        return self._datasets[dataset_config]

    def loader(self, config: TrainConfig, split: str) -> GraphLoader:
        dataset = self.dataset(config)
        return GraphLoader(
            dataset.splits[split],
            dataset.frames,
            config.batch_size,
            input_frame=config.input_frame,
            target_frame=config.target_frame,
        )


@dataclasses.dataclass
class _SeedRun:
    """Host-side state of one seed while its group trains."""

    config: TrainConfig
    directory: RunDirectory
    state: dict[str, Any]
    meta: dict[str, Any]
    metrics: list[dict[str, Any]]
    start_epoch: int
    last_checkpoint: int
    status: str = "finished"
    summary: dict[str, Any] | None = None


def train_seed_group(
    configs: Sequence[TrainConfig],
    run_dirs: Sequence[str | Path],
    *,
    data: DataCache | None = None,
    data_root: str | Path = "data",
    checkpoints: bool = True,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train configs that differ only in ``seed`` as one vmapped run.

    Args:
      configs: ``S`` configs equal in every field but ``seed``; seeds unique.
      run_dirs: one run directory per config. A directory whose run already
        ended is left as it is. An unfinished run of the same config
        continues from its latest checkpoint, or from epoch 0 without one.
      data: a cache of datasets shared across groups; built from
        ``data_root`` when None.
      checkpoints: save each seed's orbax checkpoint at every evaluation, as
        a separate run does. Without them an interrupted seed restarts.
      progress: show a progress bar over the batches of each epoch.

    Returns:
      The summaries (``summary.json`` contents) in the order of ``configs``.

    Raises:
      ValueError: configs that differ in more than the seed, repeated seeds,
        a wrong number of run directories, or a run directory that contains
        another config (:class:`~geonorm_jax.rundir.RunDirectoryError`).
      KeyboardInterrupt: after writing ``interrupted at epoch k`` summaries.
    """
    configs = list(configs)
    if not configs:
        return []
    if len(run_dirs) != len(configs):
        raise ValueError(f"got {len(run_dirs)} run directories for {len(configs)} configs")
    if len(group_by_seed(configs)) != 1:
        raise ValueError("train_seed_group needs configs that differ only in seed; pass mixed configs to run_sweep")
    for config in configs:
        config.validate()
    data = data if data is not None else DataCache(data_root, progress=progress)
    config = configs[0]

    runs: list[_SeedRun | None] = []
    summaries: list[dict[str, Any] | None] = []
    for seed_config, run_dir in zip(configs, run_dirs):
        directory = RunDirectory(run_dir)
        resume = directory.config_path.exists() and directory.has_outputs()
        mode = directory.prepare(seed_config, resume=resume, overwrite=False)
        if mode == "done":
            summaries.append(directory.read_summary())
            runs.append(None)
            log.info("%s already ended (%s)", directory.path, summaries[-1]["status"])
        else:
            summaries.append(None)
            runs.append(_SeedRun(seed_config, directory, {}, {}, [], 0, 0))
    pending = [run for run in runs if run is not None]
    if not pending:
        return summaries

    loaders = {split: data.loader(config, split) for split in ("train", "valid", "test")}
    baselines = baseline_mse(data.dataset(config).splits["test"], data.dataset(config).frames, config)
    model = training.build_model(config)
    optimizer = training.make_optimizer(config)
    example = next(iter(loaders["train"].epoch(None)))
    for run in pending:
        _initialize_seed(run, model, optimizer, example)

    # Seeds resumed from checkpoints of different epochs cannot share a stack.
    start_epochs = sorted({run.start_epoch for run in pending})
    for start_epoch in start_epochs:
        cohort = [run for run in pending if run.start_epoch == start_epoch]
        _train_cohort(cohort, model, optimizer, loaders, baselines, checkpoints, progress)

    for index, run in enumerate(runs):
        if run is not None:
            summaries[index] = run.summary
    return summaries


def _initialize_seed(run: _SeedRun, model, optimizer, example: jraph.GraphsTuple) -> None:
    """Initialize ``run`` exactly as a separate run of its seed does, or restore its checkpoint."""
    init_key, shuffle_key = jax.random.split(jax.random.PRNGKey(run.config.seed))
    params = training.init_params(model, example, init_key)
    run.state = {
        "params": params,
        "opt_state": optimizer.init(params),
        "best_params": jax.tree.map(jnp.copy, params),
        "shuffle_key": shuffle_key,
    }
    run.meta = {"best_valid_mse": math.inf, "best_test_mse": None, "best_epoch": None}
    run.metrics = []
    if run.directory.latest_checkpoint() is not None:
        epoch, state, meta = run.directory.restore_checkpoint(run.state)
        run.metrics = [record for record in meta.pop("metrics") if record["epoch"] <= epoch]
        if meta["best_valid_mse"] is None:
            meta["best_valid_mse"] = math.inf
        run.state, run.meta, run.start_epoch, run.last_checkpoint = state, meta, epoch, epoch
        log.info("Resuming %s from epoch %d", run.directory.path, epoch)
    run.directory.write_metrics(run.metrics)


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _lane(tree: Any, index: int) -> Any:
    return jax.tree.map(lambda leaf: leaf[index], tree)


def _select_lanes(tree: Any, indices: Sequence[int]) -> Any:
    keep = np.asarray(indices)
    return jax.tree.map(lambda leaf: leaf[keep], tree)


GRAPH_AXES = jraph.GraphsTuple(
    nodes=0, edges=0, senders=None, receivers=None, n_node=None, n_edge=None, globals=None
)
"""vmap axes of a seed-stacked batch: features per seed, one shared padded structure."""


def stack_graphs(batches: Sequence[jraph.GraphsTuple]) -> jraph.GraphsTuple:
    """Stack one batch per seed into a batch with ``[S, ...]`` node and edge features.

    Every batch of one epoch position has the same padded structure (the
    loader fills batches in order, so only the last one is ragged and it has
    the same size for every seed). The structure is kept once, unbatched;
    vmap the consumer with :data:`GRAPH_AXES`. Host-side numpy.

    Raises:
      ValueError: the batches differ in ``n_node`` or ``n_edge``.
    """
    first = batches[0]
    for batch in batches[1:]:
        if not (np.array_equal(batch.n_node, first.n_node) and np.array_equal(batch.n_edge, first.n_edge)):
            raise ValueError("seed batches of one step must share n_node and n_edge to be stacked")
    stack = lambda *leaves: np.stack(leaves)  # noqa: E731
    return first._replace(
        nodes=jax.tree.map(stack, *[batch.nodes for batch in batches]),
        edges=jax.tree.map(stack, *[batch.edges for batch in batches]),
    )


def _train_cohort(cohort, model, optimizer, loaders, baselines, checkpoints, progress) -> None:
    """Train seeds that start at the same epoch; write their outputs and summaries."""
    config = cohort[0].config
    start_epoch = cohort[0].start_epoch
    active = list(cohort)
    params = _stack([run.state["params"] for run in active])
    opt_state = _stack([run.state["opt_state"] for run in active])
    elapsed_before = max((run.metrics[-1]["wall_time"] for run in active if run.metrics), default=0.0)
    started = time.perf_counter() - elapsed_before

    train_step = training.jit_train_step(
        jax.vmap(training.make_train_step(model, optimizer), in_axes=(0, 0, GRAPH_AXES))
    )
    eval_step = jax.jit(
        jax.vmap(lambda p, graph: training.batch_loss(model, p, graph), in_axes=(0, None))
    )
    seeds_text = ", ".join(str(run.config.seed) for run in active)
    log.info("Training seeds %s of %s from epoch %d", seeds_text, _describe(config), start_epoch)

    epoch = start_epoch
    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            epoch_keys = [jax.random.fold_in(run.state["shuffle_key"], epoch) for run in active]
            params, opt_state, train_mse, grad_norm = _train_epoch(
                train_step, params, opt_state, loaders["train"], epoch_keys, epoch, config, progress
            )
            now = time.perf_counter() - started
            evaluate_now = epoch % config.eval_every == 0 or epoch == config.epochs
            survivors = []
            for lane, run in enumerate(active):
                record = {
                    "epoch": epoch,
                    "train_mse": train_mse[lane],
                    "grad_norm": grad_norm[lane],
                    "valid_mse": None,
                    "test_mse": None,
                    "wall_time": now,
                }
                run.metrics.append(record)
                if not (math.isfinite(train_mse[lane]) and train_mse[lane] <= config.divergence_bound):
                    run.status = f"diverged at epoch {epoch}"
                    log.warning("Seed %d: training loss %s, %s", run.config.seed, train_mse[lane], run.status)
                    run.directory.append_metrics(record)
                    run.summary = _finish(run, baselines, started)
                else:
                    survivors.append(lane)

            if evaluate_now and survivors:
                lanes = np.asarray(survivors)
                valid = _evaluate(eval_step, _select_lanes(params, lanes), loaders["valid"])
                test = _evaluate(eval_step, _select_lanes(params, lanes), loaders["test"])
                for position, lane in enumerate(survivors):
                    _record_evaluation(active[lane], params, lane, valid[position], test[position])

            for lane in survivors:
                run = active[lane]
                run.directory.append_metrics(run.metrics[-1])
                if evaluate_now and checkpoints:
                    _save_checkpoint(run, params, opt_state, lane, epoch)

            if len(survivors) < len(active):
                # Dropping lanes changes the stacked shape, so the step compiles once more.
                active = [active[lane] for lane in survivors]
                if not active:
                    break
                params = _select_lanes(params, survivors)
                opt_state = _select_lanes(opt_state, survivors)
    except KeyboardInterrupt:
        for run in active:
            finished = run.metrics[-1]["epoch"] if run.metrics else start_epoch
            run.status = f"interrupted at epoch {finished}"
            run.summary = _finish(run, baselines, started)
        raise

    for run in active:
        run.summary = _finish(run, baselines, started)


def _train_epoch(train_step, params, opt_state, loader, epoch_keys, epoch, config, progress):
    """Run one epoch of every seed; return params, opt_state, per-seed MSEs and mean gradient norms.

    Like the single-run loop, a seed's epoch MSE is NaN when any of its step
    losses is non-finite or above the divergence bound. Each step's metrics
    are read one step late so the host builds the next batch meanwhile.
    """
    num_seeds = len(epoch_keys)
    total_loss = np.zeros(num_seeds)
    total_graphs = np.zeros(num_seeds)
    healthy = np.ones(num_seeds, dtype=bool)
    grad_norms = []
    bar = tqdm(total=len(loader), desc=f"epoch {epoch}", leave=False, disable=not progress, unit="batch")

    def consume(step_metrics):
        losses = np.asarray(step_metrics.loss, dtype=np.float64)  # [S]
        num_graphs = np.asarray(step_metrics.num_graphs, dtype=np.float64)  # [S]
        for lane in range(num_seeds):
            # Python floats, summed in step order, as in the single-run loop.
            total_loss[lane] = float(total_loss[lane]) + float(losses[lane]) * float(num_graphs[lane])
            total_graphs[lane] += num_graphs[lane]
        healthy[:] &= np.isfinite(losses) & (losses <= config.divergence_bound)
        grad_norms.append(np.asarray(step_metrics.grad_norm, dtype=np.float64))
        bar.update(1)

    pending = None
    streams = [loader.epoch(key) for key in epoch_keys]
    for batches in zip(*streams, strict=True):
        params, opt_state, step_metrics = train_step(params, opt_state, stack_graphs(batches))
        if pending is not None:
            consume(pending)
        pending = step_metrics
    if pending is not None:
        consume(pending)
    bar.close()

    epoch_mse = np.where(healthy, total_loss / np.maximum(total_graphs, 1), np.nan)
    mean_grad_norm = np.mean(np.stack(grad_norms), axis=0) if grad_norms else np.full(num_seeds, np.nan)
    return params, opt_state, [float(value) for value in epoch_mse], [float(value) for value in mean_grad_norm]


def _evaluate(eval_step, params, loader) -> list[float]:
    """Return each seed's MSE over every real system of ``loader`` (see :func:`training.evaluate`)."""
    total = None
    count = jnp.zeros(())
    for graph in loader.epoch(None):
        losses = eval_step(params, graph)  # [S]
        num_graphs = graphs.graph_mask(graph).sum()
        total = losses * num_graphs if total is None else total + losses * num_graphs
        count = count + num_graphs
    return [float(value) for value in total / jnp.maximum(count, 1)]


def _record_evaluation(run: _SeedRun, params, lane: int, valid_mse: float, test_mse: float) -> None:
    record = run.metrics[-1]
    record["valid_mse"], record["test_mse"] = valid_mse, test_mse
    if valid_mse < run.meta["best_valid_mse"]:
        run.meta.update(best_valid_mse=valid_mse, best_test_mse=test_mse, best_epoch=record["epoch"])
        run.state["best_params"] = _lane(params, lane)
        run.directory.save_best_params(run.state["best_params"])
    log.info(
        "seed %d epoch %d: train %.5f, valid %.5f, test %.5f (best valid %.5f at epoch %s)",
        run.config.seed, record["epoch"], record["train_mse"], valid_mse, test_mse,
        run.meta["best_valid_mse"], run.meta["best_epoch"],
    )


def _save_checkpoint(run: _SeedRun, params, opt_state, lane: int, epoch: int) -> None:
    """Save the seed's state in the layout of a separate run's checkpoint."""
    run.state["params"] = _lane(params, lane)
    run.state["opt_state"] = _lane(opt_state, lane)
    run.directory.save_checkpoint(epoch, run.state, {**run.meta, "metrics": run.metrics})
    run.last_checkpoint = epoch


def _finish(run: _SeedRun, baselines: dict[str, float], started: float) -> dict[str, Any]:
    """Write the seed's summary and loss-curve plot, with the fields of a separate run."""
    config = run.config
    best_valid = run.meta["best_valid_mse"]
    summary = {
        "status": run.status,
        "epochs_completed": run.metrics[-1]["epoch"] if run.metrics else 0,
        "best_epoch": run.meta["best_epoch"],
        "best_valid_mse": best_valid if math.isfinite(best_valid) else None,
        "test_mse": run.meta["best_test_mse"],
        "final_train_mse": run.metrics[-1]["train_mse"] if run.metrics else None,
        "baseline_test_mse": baselines,
        "wall_time": time.perf_counter() - started,
        "run_dir": str(run.directory.path),
    }
    run.directory.write_summary(summary)
    title = (
        f"EGNN + {config.norm}, N={config.n_particles}, {config.num_layers} layers, "
        f"lr {config.learning_rate:g}, seed {config.seed}\n{run.status}"
    )
    plot_loss_curves(run.directory.read_metrics(), run.directory.plot_path, title)
    return summary


def _describe(config: TrainConfig) -> str:
    return default_run_dir(config, root="").name.rsplit("_seed", 1)[0]


def _check_run_dirs(configs: Sequence[TrainConfig], run_dirs: dict[int, Path]) -> None:
    """Raise before any training when a run directory contains another config."""
    for config in configs:
        directory = RunDirectory(run_dirs[id(config)])
        if not directory.config_path.exists():
            continue
        stored = directory.read_config()
        if stored != config:
            differences = ", ".join(
                f"{name}: stored {value!r}, requested {getattr(config, name)!r}"
                for name, value in stored.to_dict().items()
                if getattr(config, name) != value
            )
            raise RunDirectoryError(
                f"{directory.path} contains a run of another config ({differences}); choose another "
                "output directory for this sweep, or delete that run directory to train it again"
            )


def run_sweep(
    configs: Sequence[TrainConfig],
    run_dir_fn: RunDirFn | None = None,
    *,
    root: str | Path = "runs",
    data_root: str | Path = "data",
    checkpoints: bool = True,
    progress: bool = True,
) -> list[RunResult]:
    """Train every config, the seeds of one configuration vmapped together.

    Args:
      configs: the sweep. Configs equal but for the seed form one group.
      run_dir_fn: maps a config to its run directory; defaults to
        :func:`geonorm_jax.train.default_run_dir` under ``root``.
      root: parent of the default run directories.
      data_root: directory of the generated datasets (one per N and size).
      checkpoints: see :func:`train_seed_group`.
      progress: show a progress bar over configs and one over batches.

    Returns:
      One :class:`RunResult` per config, in the order of ``configs``.
      Configs whose run directory already ended are not trained again.

    Raises:
      ValueError: a repeated config, an invalid one, or a run directory that
        contains another config (checked before any training starts).
      KeyboardInterrupt: after the interrupted seeds wrote their summaries.
    """
    if run_dir_fn is None:
        run_dir_fn = lambda config: default_run_dir(config, root)  # noqa: E731
    configs = list(configs)
    groups = group_by_seed(configs)
    run_dirs = {id(config): Path(run_dir_fn(config)) for config in configs}
    results: dict[int, RunResult] = {}

    _check_run_dirs(configs, run_dirs)
    todo = []
    for group in groups:
        remaining = []
        for config in group:
            summary = RunDirectory(run_dirs[id(config)]).read_summary()
            if summary is not None and is_complete(summary):
                results[id(config)] = RunResult(config, run_dirs[id(config)], summary)
            else:
                remaining.append(config)
        if remaining:
            todo.append(remaining)
    skipped = len(results)
    if skipped:
        log.info("Skipping %d of %d configs whose runs already ended", skipped, len(configs))

    data = DataCache(data_root, progress=progress)
    bar = tqdm(total=len(configs), initial=skipped, desc="configs", disable=not progress, unit="config")
    try:
        for group in todo:
            bar.set_postfix_str(_describe(group[0]))
            summaries = train_seed_group(
                group,
                [run_dirs[id(config)] for config in group],
                data=data,
                checkpoints=checkpoints,
                progress=progress,
            )
            for config, summary in zip(group, summaries):
                results[id(config)] = RunResult(config, run_dirs[id(config)], summary)
                log.info("%s: %s", run_dirs[id(config)], summary["status"])
            bar.update(len(group))
    finally:
        bar.close()
    return [results[id(config)] for config in configs]
