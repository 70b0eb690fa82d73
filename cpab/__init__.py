"""CPAB transformations (continuous piecewise-affine velocity fields on [-1, 1]^2); torch + numpy only.

`cpab.CPAB` is the public entry point. `cpab.basis` builds the tessellation and the null-space basis,
`cpab.integrate` is the reference integrator and `cpab.fit` the reference keypoint fits (PyTorch);
`cpab.fused` is the Triton backend (kernels in `cpab.kernels`, imported on first use, and whole fits as
CUDA graphs via `cpab.graphs`); `cpab.counting` counts kernel launches and host syncs of any callable.
"""
from .transform import CPAB

__version__ = "0.2.0"
__all__ = ["CPAB"]
