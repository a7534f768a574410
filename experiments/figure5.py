"""Figure 5: training curves of EGNN, EGNN + ScaleNorm and EGNN + GeoNorm over seeds and learning rates.

For each system size N and depth, trains every model of ``--models`` for
every seed and learning rate (the seeds of one model vmapped together), and
draws one PNG per (N, depth) with one panel per (learning rate, seed).
GeoNorm of Meng et al. (2024) is the red curve, and our GeoNorm modes are dashed.
Output: ``figure5_N{n}_L{layers}.png``, ``figure5_runs.md`` / ``.csv`` and
``runs/`` under ``--out``.
"""

import sys

from geonorm_jax import experiments


def main(argv=None) -> int:
    parser = experiments.build_parser("figure5", __doc__.splitlines()[0])
    experiments.add_axis_arguments(parser, experiments.AXES["cpu"]["figure5"])
    args = parser.parse_args(argv)
    experiments.configure_script()

    try:
        outputs = experiments.run_figure5(
            args.out,
            experiments.sizes_from_args("figure5", args),
            experiments.axes_from_args("figure5", args),
            overrides=experiments.extra_overrides(args),
            data_root=args.data_root,
            progress=not args.no_progress,
            checkpoints=not args.no_checkpoints,
        )
    except ValueError as error:
        parser.error(str(error))
    except KeyboardInterrupt:
        print("Interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    for name, path in outputs.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
