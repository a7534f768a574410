"""Table 1: test MSE of EGNN + LayerNorm / ScaleNorm / GeoNorm under random rotations and translations.

Trains every model of ``--models`` for each N, depth and seed, then
evaluates the params with the best validation MSE on the test set. The
table gives the mean, median and max per-system MSE under a random rotation
and under a random translation of the input, and their increase (delta) over
the untransformed MSE. Its last column is the largest equivariance error
``|f(R x + t, R v) - (R f(x, v) + t)|``. Output: ``table1.md``,
``table1.csv`` and ``runs/`` (each with ``rte.json``) under ``--out``.
"""

import sys

from geonorm_jax import experiments


def main(argv=None) -> int:
    parser = experiments.build_parser("table1", __doc__.splitlines()[0])
    experiments.add_axis_arguments(parser, experiments.AXES["cpu"]["table1"])
    args = parser.parse_args(argv)
    experiments.configure_script()

    try:
        outputs = experiments.run_table1(
            args.out,
            experiments.sizes_from_args("table1", args),
            experiments.axes_from_args("table1", args),
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
