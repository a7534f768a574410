"""Benchmark of EGNN forward and training-step throughput (graphs per second).

Run with ``python -m benchmarks.bench_model`` (``make bench-model``). For
each system size the model (4 layers, width 64 by default) is built with
and without GeoNorm, both jitted functions are compiled once, then each is
run until ``--min-seconds`` have passed, the best of ``--repeats`` runs
kept. The training step is the one of ``make train``
(:func:`geonorm_jax.training.make_train_step` with the default
configuration's optimizer), jitted with its buffers donated.

The reference figures are the training throughput of the reference PyTorch
EGNN on a 2-core AMD EPYC: about 5,300, 360, 55 and 7.2 graphs/s at
N = 5, 20, 50, 100 (batches of 100 at N = 5, 50 otherwise).
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_data import machine_info
from geonorm_jax import egnn, graphs, training
from geonorm_jax.config import make_config
from geonorm_jax.logs import configure_logging

REFERENCE_TRAIN_GRAPHS_PER_SECOND = {5: 5300.0, 20: 360.0, 50: 55.0, 100: 7.2}
DEFAULT_SIZES = ((5, 100), (20, 50), (50, 50), (100, 50))


def random_batch(n_particles: int, batch_size: int, seed: int = 0):
    """Build a full batch of random systems at the data's scale (positions ~ (N/5)^(1/3), speed 0.5)."""
    rng = np.random.default_rng(seed)
    shape = (batch_size, n_particles, 3)
    x = rng.normal(size=shape) * (n_particles / 5.0) ** (1.0 / 3.0)
    v = rng.normal(size=shape)
    v = 0.5 * v / np.linalg.norm(v, axis=-1, keepdims=True)
    charges = rng.choice([-1.0, 1.0], size=shape[:2])
    return graphs.build_graphs(x, v, charges, x + v, batch_size=batch_size)


def _best_rate(step, batch_size: int, min_seconds: float, repeats: int) -> float:
    """Run ``step()`` (which blocks) until ``min_seconds`` pass; return the best graphs/s of ``repeats`` runs."""
    best = 0.0
    for _ in range(repeats):
        iterations = 0
        start = time.perf_counter()
        while True:
            step()
            iterations += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        best = max(best, iterations * batch_size / elapsed)
    return best


def measure_one(
    n_particles: int,
    batch_size: int,
    norm: str,
    *,
    num_layers: int = 4,
    hidden_dim: int = 64,
    min_seconds: float = 2.0,
    repeats: int = 2,
    message_passing: str = "auto",
) -> dict:
    """Measure forward and training-step throughput of one model on one batch shape.

    ``message_passing`` selects the EGNN implementation (see
    :class:`geonorm_jax.egnn.EGNN`). Returns a dict with the configuration,
    ``compile_seconds`` (forward and training step together),
    ``forward_graphs_per_second`` and ``train_graphs_per_second``.
    """
    model = egnn.EGNN(
        num_layers=num_layers,
        hidden_dim=hidden_dim,
        norm=norm,
        num_particles=n_particles,
        message_passing=message_passing,
    )
    graph = jax.tree_util.tree_map(jnp.asarray, random_batch(n_particles, batch_size))
    params = jax.jit(model.init)(jax.random.key(0), graph)
    # The training step of `make train`: weight decay, Adam and the gradient
    # norm, with the parameter and optimizer buffers donated.
    optimizer = training.make_optimizer(make_config())
    train_step = training.jit_train_step(training.make_train_step(model, optimizer))
    forward = jax.jit(model.apply)
    # Donation consumes the step's inputs, so the step gets its own copy.
    state = {"params": jax.tree_util.tree_map(jnp.copy, params)}
    state["optimizer_state"] = optimizer.init(state["params"])

    def run_train_step():
        state["params"], state["optimizer_state"], metrics = train_step(
            state["params"], state["optimizer_state"], graph
        )
        jax.block_until_ready(metrics)

    start = time.perf_counter()
    jax.block_until_ready(forward(params, graph))
    run_train_step()
    compile_seconds = time.perf_counter() - start

    forward_rate = _best_rate(lambda: jax.block_until_ready(forward(params, graph)), batch_size, min_seconds, repeats)
    train_rate = _best_rate(run_train_step, batch_size, min_seconds, repeats)
    return {
        "n_particles": n_particles,
        "batch_size": batch_size,
        "norm": norm,
        "message_passing": message_passing,
        "num_layers": num_layers,
        "hidden_dim": hidden_dim,
        "compile_seconds": compile_seconds,
        "forward_graphs_per_second": forward_rate,
        "train_graphs_per_second": train_rate,
    }


def measure_model_throughput(
    sizes=DEFAULT_SIZES,
    norms=("none", "geonorm"),
    *,
    num_layers: int = 4,
    hidden_dim: int = 64,
    min_seconds: float = 2.0,
    repeats: int = 2,
) -> dict:
    """Measure EGNN throughput for every ``(N, batch_size)`` in ``sizes`` and every norm.

    Returns:
      ``{"machine": machine_info(), "results": [...]}``, one dict per
      (size, norm) as from :func:`measure_one`, plus
      ``reference_train_graphs_per_second`` and ``train_ratio`` (ours over
      the reference PyTorch figure; None where no reference exists).
    """
    results = []
    for n_particles, batch_size in sizes:
        for norm in norms:
            logging.info("measuring N=%d batch=%d norm=%s", n_particles, batch_size, norm)
            result = measure_one(
                n_particles,
                batch_size,
                norm,
                num_layers=num_layers,
                hidden_dim=hidden_dim,
                min_seconds=min_seconds,
                repeats=repeats,
            )
            reference = REFERENCE_TRAIN_GRAPHS_PER_SECOND.get(n_particles)
            result["reference_train_graphs_per_second"] = reference
            result["train_ratio"] = result["train_graphs_per_second"] / reference if reference else None
            results.append(result)
    return {"machine": machine_info(), "results": results}


def format_report(report: dict) -> str:
    """Format :func:`measure_model_throughput`'s output as a Markdown table with the machine above it."""
    machine = report["machine"]
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, load {machine['load_average_1min']:.1f}, "
        f"jax {machine['jax']}, backend {machine['backend']}",
        "",
        "| N | batch | norm | forward graphs/s | train graphs/s | reference train graphs/s | ratio | compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in report["results"]:
        reference = result["reference_train_graphs_per_second"]
        ratio = result["train_ratio"]
        lines.append(
            f"| {result['n_particles']} | {result['batch_size']} | {result['norm']} "
            f"| {result['forward_graphs_per_second']:.1f} | {result['train_graphs_per_second']:.1f} "
            f"| {reference if reference is not None else '-'} | {f'{ratio:.2f}' if ratio is not None else '-'} "
            f"| {result['compile_seconds']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes",
        default=",".join(f"{n}:{b}" for n, b in DEFAULT_SIZES),
        help="comma-separated N:batch_size pairs (default: %(default)s)",
    )
    parser.add_argument("--layers", type=int, default=4, help="EGNN layers (default: %(default)s)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden width (default: %(default)s)")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="seconds per timed run (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per case; the best is kept")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    configure_logging()

    sizes = [tuple(int(part) for part in pair.split(":")) for pair in args.sizes.split(",")]
    report = measure_model_throughput(
        sizes,
        num_layers=args.layers,
        hidden_dim=args.hidden,
        min_seconds=args.min_seconds,
        repeats=args.repeats,
    )
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as output:
            json.dump(report, output, indent=2)


if __name__ == "__main__":
    main()
