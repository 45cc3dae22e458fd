"""ayt: Align Your Tangent (Kim, Cha, Ye 2025, arXiv 2510.00658), reference implementation.

Conventions used throughout the package:
  * images are NCHW float32 tensors in [-1, 1];
  * t, r are noise levels (EDM sigma) with x_t = x_0 + t * eps;
  * D_t = f_theta(x_t, t) is the student output, D_r the (stop-gradient) teacher output;
  * phi is the frozen manifold feature network, phi.features(x) -> list[Tensor].
"""
__version__ = "0.1.0"

from .augment import AUG_SETS, AugmentPipe
from .config import PRESETS, TrainConfig, make_config
from .consistency import (TRSchedule, consistency_forward, consistency_sample, ect_loss, edm_heun_sample,
                          sample_1step, sample_2step, sample_t_r)
from .features import build_feature_net, freeze
from .losses import MFD, direction_surrogate, distance_direction, mfd, pseudo_huber
from .networks import EDMPrecond, build_network, load_edm_checkpoint
from .runs import load_run_model
from .train import train

__all__ = [
    "AUG_SETS", "AugmentPipe", "PRESETS", "TrainConfig", "make_config", "TRSchedule", "consistency_forward",
    "consistency_sample", "ect_loss", "edm_heun_sample", "sample_1step", "sample_2step", "sample_t_r",
    "build_feature_net", "freeze", "MFD", "direction_surrogate", "distance_direction", "mfd", "pseudo_huber",
    "EDMPrecond", "build_network", "load_edm_checkpoint", "load_run_model", "train",
]
