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
    return experiments.run_grid_script("figure5", argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
