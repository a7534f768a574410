"""Benchmark of charged N-body data generation (simulations per second).

Run with ``python -m benchmarks.bench_data`` (``make bench-data``). Each size
is compiled once, then ``--chunks`` full chunks of 49-frame trajectories
(4900 steps each) are timed, the best of ``--repeats`` runs kept. The
reference figures are the per-simulation times of the reference numpy
generator measured on a 2-core AMD EPYC: 0.107, 0.147, 0.286 and 1.22 s at
N = 5, 20, 50, 100.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax

from geonorm_jax import simulation

REFERENCE_SECONDS_PER_SIMULATION = {5: 0.107, 20: 0.147, 50: 0.286, 100: 1.22}
TARGET_SPEEDUP = 14.0


def machine_info() -> dict:
    """Return the CPU model, core count, load average, jax version and backend."""
    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu_model,
        "cores": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(device) for device in jax.devices()],
    }


def measure_data_generation(sizes=(5, 20, 50, 100), chunks: int = 2, repeats: int = 2) -> dict:
    """Measure the simulator's throughput for each N in ``sizes``.

    Args:
      sizes: particle counts N.
      chunks: full chunks (:func:`simulation.default_chunk_size`) timed per run.
      repeats: timed runs per size; the fastest is reported.

    Returns:
      ``{"machine": machine_info(), "results": [...]}`` with one dict per N:
      ``n_particles``, ``chunk_size``, ``n_simulations``, ``seconds`` (wall),
      ``cpu_seconds`` (process CPU time of that run), ``simulations_per_second``
      (wall), ``simulations_per_cpu_second``,
      ``reference_simulations_per_second`` and ``speedup`` (None where no
      reference figure exists), and ``target_speedup``.
    """
    results = []
    for n_particles in sizes:
        chunk_size = simulation.default_chunk_size(n_particles)
        n_simulations = chunks * chunk_size

        # Compile outside the timed runs.
        simulation.simulate(0, "train", chunk_size, n_particles, progress=False)

        best_seconds, best_cpu_seconds = float("inf"), float("inf")
        for repeat in range(repeats):
            cpu_start = time.process_time()
            start = time.perf_counter()
            simulation.simulate(repeat + 1, "train", n_simulations, n_particles, chunk_size=chunk_size, progress=False)
            seconds = time.perf_counter() - start
            if seconds < best_seconds:
                best_seconds, best_cpu_seconds = seconds, time.process_time() - cpu_start

        rate = n_simulations / best_seconds
        reference_seconds = REFERENCE_SECONDS_PER_SIMULATION.get(n_particles)
        results.append(
            {
                "n_particles": n_particles,
                "chunk_size": chunk_size,
                "n_simulations": n_simulations,
                "seconds": best_seconds,
                "cpu_seconds": best_cpu_seconds,
                "simulations_per_second": rate,
                "simulations_per_cpu_second": n_simulations / best_cpu_seconds,
                "reference_simulations_per_second": None if reference_seconds is None else 1.0 / reference_seconds,
                "speedup": None if reference_seconds is None else rate * reference_seconds,
                "target_speedup": TARGET_SPEEDUP,
            }
        )
    return {"machine": machine_info(), "results": results}


def format_report(report: dict) -> str:
    """Format :func:`measure_data_generation` output as a Markdown table."""
    machine = report["machine"]
    lines = [
        f"machine: {machine['cpu']}, {machine['cores']} cores, load average {machine['load_average_1min']:.2f}, "
        f"jax {machine['jax']}, backend {machine['backend']}",
        "",
        "| N | chunk | sims timed | wall s | CPU s | sims/s | sims/CPU-s | reference sims/s | speedup | target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        reference = row["reference_simulations_per_second"]
        speedup = row["speedup"]
        lines.append(
            f"| {row['n_particles']} | {row['chunk_size']} | {row['n_simulations']} | {row['seconds']:.2f} | "
            f"{row['cpu_seconds']:.2f} | {row['simulations_per_second']:.1f} | "
            f"{row['simulations_per_cpu_second']:.1f} | "
            f"{'-' if reference is None else f'{reference:.1f}'} | {'-' if speedup is None else f'{speedup:.1f}x'} | "
            f"{row['target_speedup']:.0f}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    """Run the benchmark and print a Markdown table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_data", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 20, 50, 100], help="particle counts N")
    parser.add_argument("--chunks", type=int, default=2, help="full chunks timed per run (default 2)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per size, fastest kept (default 2)")
    args = parser.parse_args(argv)
    print(format_report(measure_data_generation(tuple(args.sizes), args.chunks, args.repeats)))


if __name__ == "__main__":
    main()
