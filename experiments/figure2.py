"""Figure 2: training curves of EGNN without normalization, over depth and over system size.

Trains vanilla EGNN (no coordinate norm) at depths 1, 3, 5, 10 for N = 20
and 50 particles, and at N = 20, 50, 100 for 3 layers, then draws the
training MSE per epoch on a log scale. Output: ``figure2.png``,
``figure2_runs.md`` / ``.csv`` and ``runs/`` under ``--out``.
"""

import sys

from geonorm_jax import experiments


def main(argv=None) -> int:
    parser = experiments.build_parser("figure2", __doc__.splitlines()[0])
    axes = experiments.Figure2Axes()
    group = parser.add_argument_group("grid axes (comma-separated lists)")
    group.add_argument("--depths", type=experiments.int_list, help=f"EGNN depths of the depth panels (default {axes.depths})")
    group.add_argument("--depth-panel-n", type=experiments.int_list,
                       help=f"system sizes N with one depth panel each (default {axes.depth_panel_n})")
    group.add_argument("--size-panel-n", type=experiments.int_list,
                       help=f"system sizes N of the size panel (default {axes.size_panel_n})")
    group.add_argument("--size-panel-depth", type=int,
                       help=f"EGNN depth of the size panel (default {axes.size_panel_depth})")
    group.add_argument("--seeds", type=experiments.int_list, help=f"seeds (default {axes.seeds})")
    group.add_argument("--lr", type=float, help=f"Adam learning rate (default {axes.learning_rate:g})")
    args = parser.parse_args(argv)

    flags = {
        "depths": args.depths,
        "depth_panel_n": args.depth_panel_n,
        "size_panel_n": args.size_panel_n,
        "size_panel_depth": args.size_panel_depth,
        "seeds": args.seeds,
        "learning_rate": args.lr,
    }

    def run():
        axes = experiments.Figure2Axes(**{key: value for key, value in flags.items() if value is not None})
        return experiments.run_figure2(
            args.out,
            experiments.sizes_from_args("figure2", args),
            axes,
            overrides=experiments.extra_overrides(args),
            data_root=args.data_root,
            progress=not args.no_progress,
            checkpoints=not args.no_checkpoints,
        )

    return experiments.run_script(parser, run)


if __name__ == "__main__":
    sys.exit(main())
