"""GeoNorm and SE(3)-equivariant EGNNs for charged N-body dynamics, in JAX/Flax."""

__version__ = "0.1.0"
