"""CPAB transformations (continuous piecewise-affine velocity fields on [-1, 1]^2); torch + numpy only.

`cpab.CPAB` is the public entry point; `cpab.basis` builds the tessellation and the null-space basis,
`cpab.integrate` is the pure integrator (the reference for fused kernels), `cpab.fit` the keypoint fits.
"""
from .transform import CPAB

__all__ = ["CPAB"]
