"""Human motion guidance (Shen et al. 2024, §5.3, Table 3): pybullet's humanoid motion capture, a small
motion diffusion model, targeting/avoidance/path losses and motion augmentation.

``load_model()`` returns the shipped model (``lossguide/models/weights/motion-mdm.safetensors``); the
data needs ``pip install 'lossguide[motion]'`` (pybullet, whose package holds the clips).
"""

from lossguide.motion.augment import MotionAugment
from lossguide.motion.data import MotionData, forward_kinematics
from lossguide.motion.losses import ObstacleLoss, PathLoss, TargetLoss, on_normalized
from lossguide.motion.model import MotionModel, load_model

__all__ = [
    "MotionAugment",
    "MotionData",
    "MotionModel",
    "ObstacleLoss",
    "PathLoss",
    "TargetLoss",
    "forward_kinematics",
    "load_model",
    "on_normalized",
]
