"""Combined performance report: model training and evaluation, matmul peak, data generation.

Run with ``python -m benchmarks.report`` (``make bench``), or with
``--quick`` for a short run. The report is printed and written as Markdown
and JSON to ``bench_results/`` (or ``--out``).

For every system size N the EGNN (4 layers, width 64, float32, GeoNorm) is
timed with each of its implementations: fused (the dense path with its
pair stage in the compiled CPU kernel, left out where
``geonorm_jax.cpu_kernel`` cannot run), dense, segment (gather per edge,
``segment_sum`` back) and naive (the segment path with phi_e applied to the
concatenated per-edge input, as in the reference code). Each case runs in
its own Python subprocess, so its peak resident memory (``ru_maxrss``) is
its own. By default every case runs twice, in two rounds over all cases,
and the report keeps the best rate of each kind and the larger peak
memory. On the 2-core VM these figures were measured on, whole processes
sometimes ran about 1.6x slower than the next one. The naive path is the
in-run baseline, so the speed-up is the ratio of two figures measured in
the same run.

FLOP convention (``model_flops_per_graph``): a multiply-add counts as 2
FLOPs, and only the affine layers and phi_e's per-edge input terms are
counted (activations, clips and sums are not). Per layer and directed edge
(``N (N - 1)`` per system): phi_e's second layer ``2 H**2``, phi_x's layers
``2 H**2 + 2 H``, and phi_e's first layer on the per-edge inputs
(``|x_i - x_j|**2`` and ``A`` attributes, plus the two node parts)
``2 (A + 2) H``. Per layer and node: phi_e's first layer on ``h_i`` and
``h_j`` ``4 H**2``, phi_v ``2 H**2 + 2 H`` and phi_h ``2 (2 H) H + 2 H**2``.
The embedding adds ``2 H`` per node. At H=64 an edge costs 17,024 FLOPs
per layer. A training step counts 3 times the forward FLOPs (the backward pass
of an affine layer is two matmuls of the forward's size). The dense path's
and fused paths' recomputation of the pair arrays in the backward pass and the naive
path's per-edge first layer are not counted. The count is the model's, so
GFLOP/s compare the implementations on equal work.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import pathlib
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks import bench_data, bench_model
from geonorm_jax import cpu_kernel, egnn
from geonorm_jax.logs import configure_logging

DEFAULT_SIZES = ((5, 100), (20, 50), (50, 50), (100, 50))
QUICK_SIZES = ((5, 100), (50, 50))
PATHS = ("fused", "dense", "segment", "naive")
BASELINE_PATH = "naive"
NORM = "geonorm"
NUM_LAYERS = 4
HIDDEN_DIM = 64
EDGE_ATTRIBUTES = 2  # q_i q_j and the input positions' squared distance
SQUARE_MATMUL_SIZE = 2048


def model_flops_per_graph(n_particles: int, num_layers: int = NUM_LAYERS, hidden_dim: int = HIDDEN_DIM) -> int:
    """Return the forward FLOPs of one system under the convention of the module docstring."""
    h = hidden_dim
    per_edge = 2 * h * h + (2 * h * h + 2 * h) + 2 * (EDGE_ATTRIBUTES + 2) * h
    per_node = 4 * h * h + (2 * h * h + 2 * h) + (2 * (2 * h) * h + 2 * h * h)
    edges = n_particles * (n_particles - 1)
    return num_layers * (edges * per_edge + n_particles * per_node) + n_particles * 2 * h


def _time_best(function, *args, repeats: int) -> float:
    """Return the fastest of ``repeats`` timed calls of a compiled ``function``, in seconds."""
    jax.block_until_ready(function(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(function(*args))
        best = min(best, time.perf_counter() - start)
    return best


def measure_matmul_peak(rows: list[int], hidden_dim: int = HIDDEN_DIM, repeats: int = 5) -> dict:
    """Measure float32 matmul GFLOP/s: one large square product and ``[rows, H] x [H, H]`` per entry of ``rows``."""
    key = jax.random.key(0)
    matmul = jax.jit(jnp.matmul)
    size = SQUARE_MATMUL_SIZE
    square = jax.random.normal(key, (size, size), jnp.float32)
    seconds = _time_best(matmul, square, square, repeats=repeats)
    result = {"square_size": size, "square_gflops": 2 * size**3 / seconds / 1e9, "model_shape": []}
    del square

    kernel = jax.random.normal(key, (hidden_dim, hidden_dim), jnp.float32)
    for row_count in rows:
        activations = jax.random.normal(key, (row_count, hidden_dim), jnp.float32)
        seconds = _time_best(matmul, activations, kernel, repeats=repeats)
        gflops = 2 * row_count * hidden_dim * hidden_dim / seconds / 1e9
        result["model_shape"].append({"rows": row_count, "hidden_dim": hidden_dim, "gflops": gflops})
    return result


def _run_case(n_particles: int, batch_size: int, path: str, min_seconds: float, repeats: int) -> dict:
    """Run one model case in a subprocess and return its result, including its peak memory."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.report",
        "--case",
        f"{n_particles}:{batch_size}:{path}",
        "--min-seconds",
        str(min_seconds),
        "--repeats",
        str(repeats),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(
            f"benchmark case N={n_particles} batch={batch_size} path={path} failed "
            f"(exit code {completed.returncode}):\n{completed.stderr[-4000:]}"
        )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _case_main(case: str, min_seconds: float, repeats: int) -> None:
    """Measure one case in this process and print its result as one JSON line."""
    n_particles, batch_size, path = case.split(":")
    result = bench_model.measure_one(
        int(n_particles),
        int(batch_size),
        NORM,
        num_layers=NUM_LAYERS,
        hidden_dim=HIDDEN_DIM,
        min_seconds=min_seconds,
        repeats=repeats,
        message_passing=path,
    )
    # ru_maxrss is in KiB on Linux.
    result["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result["load_average_1min"] = os.getloadavg()[0]
    print(json.dumps(result))


def _merge_runs(runs: list[dict]) -> dict:
    """Merge one case's runs: the best of each rate, the largest peak memory and load."""
    result = dict(runs[0])
    for key in ("train_graphs_per_second", "forward_graphs_per_second", "peak_memory_gib", "load_average_1min"):
        result[key] = max(run[key] for run in runs)
    result["compile_seconds"] = min(run["compile_seconds"] for run in runs)
    result["processes"] = len(runs)
    return result


def build_report(
    sizes, *, min_seconds: float, repeats: int, processes: int, data_sizes, data_chunks: int, data_repeats: int
) -> dict:
    """Run every measurement and return the report as a dict (see :func:`format_report` for its content)."""
    machine_start = bench_data.machine_info()
    fused_unavailable = cpu_kernel.unavailable_reason()
    paths = [path for path in PATHS if path != "fused" or fused_unavailable is None]
    runs = {}
    for round_number in range(1, processes + 1):
        for n_particles, batch_size in sizes:
            for path in paths:
                logging.info("model N=%d batch=%d path=%s, round %d", n_particles, batch_size, path, round_number)
                run = _run_case(n_particles, batch_size, path, min_seconds, repeats)
                runs.setdefault((n_particles, batch_size, path), []).append(run)
    cases = []
    for (n_particles, _, _), case_runs in runs.items():
        result = _merge_runs(case_runs)
        flops = model_flops_per_graph(n_particles)
        result["model_forward_flops_per_graph"] = flops
        result["train_gflops"] = 3 * flops * result["train_graphs_per_second"] / 1e9
        result["eval_gflops"] = flops * result["forward_graphs_per_second"] / 1e9
        reference = bench_model.REFERENCE_TRAIN_GRAPHS_PER_SECOND.get(n_particles)
        result["reference_train_graphs_per_second"] = reference
        result["train_ratio_to_reference"] = result["train_graphs_per_second"] / reference if reference else None
        cases.append(result)

    logging.info("matmul peak")
    rows = [batch_size * n_particles * n_particles for n_particles, batch_size in sizes]
    matmul = measure_matmul_peak(rows)

    data = None
    if data_sizes:
        logging.info("data generation N=%s", data_sizes)
        data = bench_data.measure_data_generation(tuple(data_sizes), chunks=data_chunks, repeats=data_repeats)

    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine_start": machine_start,
        "machine_end": bench_data.machine_info(),
        "config": {
            "num_layers": NUM_LAYERS,
            "hidden_dim": HIDDEN_DIM,
            "norm": NORM,
            "dtype": "float32",
            "min_seconds": min_seconds,
            "repeats": repeats,
            "processes": processes,
            "fused_kernel_unavailable": fused_unavailable,
        },
        "cases": cases,
        "matmul": matmul,
        "data_generation": data,
    }


def _find(cases, n_particles, path):
    for case in cases:
        if case["n_particles"] == n_particles and case["message_passing"] == path:
            return case
    return None


def format_report(report: dict) -> str:
    """Format :func:`build_report`'s output as Markdown."""
    start, end = report["machine_start"], report["machine_end"]
    config = report["config"]
    lines = [
        f"# Performance report {report['date']}",
        "",
        f"Machine: {start['cpu']}, {start['cores']} cores, jax {start['jax']}, backend {start['backend']}. "
        f"1-minute load average {start['load_average_1min']:.2f} at start, {end['load_average_1min']:.2f} at end.",
        f"Model: EGNN, {config['num_layers']} layers, width {config['hidden_dim']}, {config['dtype']}, "
        f"norm {config['norm']}. Each case timed for {config['min_seconds']} s, best of {config['repeats']} "
        f"in each of {config['processes']} processes.",
    ]
    if config.get("fused_kernel_unavailable"):
        lines.append(f"The fused path was not measured: {config['fused_kernel_unavailable']}.")
    lines += [
        "",
        "## Model throughput (graphs/s)",
        "",
        f"| N | batch | path | train | eval | train speed-up vs {BASELINE_PATH} | train / reference | "
        "train GFLOP/s | eval GFLOP/s | peak memory GiB | load | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in report["cases"]:
        baseline = _find(report["cases"], case["n_particles"], BASELINE_PATH)
        speedup = case["train_graphs_per_second"] / baseline["train_graphs_per_second"] if baseline else None
        ratio = case["train_ratio_to_reference"]
        path = case["message_passing"]
        fused_fits = config.get("fused_kernel_unavailable") is None
        if path == egnn.auto_message_passing((case["batch_size"], case["n_particles"]), fused_fits):
            path += " (auto)"
        lines.append(
            f"| {case['n_particles']} | {case['batch_size']} | {path} "
            f"| {case['train_graphs_per_second']:.1f} | {case['forward_graphs_per_second']:.1f} "
            f"| {'-' if speedup is None else f'{speedup:.2f}x'} | {'-' if ratio is None else f'{ratio:.2f}x'} "
            f"| {case['train_gflops']:.1f} | {case['eval_gflops']:.1f} | {case['peak_memory_gib']:.2f} "
            f"| {case['load_average_1min']:.1f} | {case['compile_seconds']:.1f} |"
        )

    matmul = report["matmul"]
    lines += [
        "",
        "## Matmul peak (float32)",
        "",
        f"Square {matmul['square_size']}^3: {matmul['square_gflops']:.1f} GFLOP/s.",
        "",
        "| rows x 64 x 64 | GFLOP/s | train ceiling graphs/s at that rate |",
        "|---|---|---|",
    ]
    for (case_n, case_batch), entry in zip(_sizes(report), matmul["model_shape"]):
        ceiling = entry["gflops"] * 1e9 / (3 * model_flops_per_graph(case_n))
        lines.append(f"| {entry['rows']} (N={case_n}, batch {case_batch}) | {entry['gflops']:.1f} | {ceiling:.1f} |")

    if report["data_generation"] is not None:
        lines += ["", "## Data generation", "", bench_data.format_report(report["data_generation"])]
    return "\n".join(lines)


def _sizes(report: dict) -> list[tuple[int, int]]:
    sizes = []
    for case in report["cases"]:
        size = (case["n_particles"], case["batch_size"])
        if size not in sizes:
            sizes.append(size)
    return sizes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run: N=5 and 50, 1 s per case, N=5 data only")
    parser.add_argument("--sizes", help="comma-separated N:batch_size pairs (default: 5:100,20:50,50:50,100:50)")
    parser.add_argument("--min-seconds", type=float, help="seconds per timed run (default 2, quick 1)")
    parser.add_argument("--repeats", type=int, help="timed runs per case, the best kept (default 2, quick 1)")
    parser.add_argument("--processes", type=int, help="subprocesses per case, the best kept (default 2, quick 1)")
    parser.add_argument("--no-data", action="store_true", help="skip the data-generation benchmark")
    parser.add_argument("--out", default="bench_results", help="output folder (default: %(default)s)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # N:batch:path, one case in this process
    args = parser.parse_args(argv)
    configure_logging()

    if args.case:
        _case_main(args.case, args.min_seconds or 2.0, args.repeats or 2)
        return

    if args.sizes:
        sizes = [tuple(int(part) for part in pair.split(":")) for pair in args.sizes.split(",")]
    else:
        sizes = list(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    data_sizes = () if args.no_data else ((5,) if args.quick else (5, 20, 50, 100))
    report = build_report(
        sizes,
        min_seconds=args.min_seconds or (1.0 if args.quick else 2.0),
        repeats=args.repeats or (1 if args.quick else 2),
        processes=args.processes or (1 if args.quick else 2),
        data_sizes=data_sizes,
        data_chunks=1 if args.quick else 2,
        data_repeats=1 if args.quick else 2,
    )

    text = format_report(report)
    print(text)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = report["date"].replace(":", "")
    (out / f"report-{stamp}.md").write_text(text + "\n")
    (out / f"report-{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    logging.info("wrote %s", out / f"report-{stamp}.md")


if __name__ == "__main__":
    main()
