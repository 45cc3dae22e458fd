"""ayt: Align Your Tangent (Kim, Cha, Ye 2025, arXiv 2510.00658), reference implementation.

Conventions used throughout the package:
  * images are NCHW float32 tensors in [-1, 1];
  * t, r are noise levels (EDM sigma) with x_t = x_0 + t * eps;
  * D_t = f_theta(x_t, t) is the student output, D_r the (stop-gradient) teacher output;
  * phi is the frozen manifold feature network, phi.features(x) -> list[Tensor].
"""
__version__ = "0.1.0"
