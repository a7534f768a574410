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
    return experiments.run_grid_script("table1", argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
