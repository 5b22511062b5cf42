"""lossguide: training-free, loss-based guidance of pretrained diffusion models.

One guidance engine (:mod:`lossguide.guidance`) drives any sampler (:mod:`lossguide.samplers`);
the methods (DPS, FreeDoM, UGD, LGD-MC, MPGD, TFG, Shen et al. 2024, classifier guidance) are
presets of it (:mod:`lossguide.presets`; ``lossguide.list_presets()`` names them, ``lossguide.preset(name, ...)``
builds one).
"""

from lossguide.augment import DiffAugment, GaussianJitter
from lossguide.autoguidance import autoguidance
from lossguide.denoiser import Denoiser, DenoiserOutput, from_diffusers, from_module
from lossguide.guidance import GuidanceConfig, GuidanceEngine, GuidanceStats
from lossguide.optimize import OptimizeResult, optimize
from lossguide.presets import PRESETS, list_presets, with_techniques
from lossguide.presets import get as preset
from lossguide.rng import make_generators
from lossguide.samplers import DDIM, DDPM, DiffusersSampler, EDMEuler, EDMHeun, FlowEuler, Sampler
from lossguide.sampling import SampleResult, sample
from lossguide.schedule import FlowSchedule, NoiseSchedule, SigmaSchedule
from lossguide.smc import smc

__version__ = "0.1.0"

__all__ = [
    "DDIM",
    "DDPM",
    "PRESETS",
    "Denoiser",
    "DenoiserOutput",
    "DiffAugment",
    "DiffusersSampler",
    "EDMEuler",
    "EDMHeun",
    "FlowEuler",
    "FlowSchedule",
    "GaussianJitter",
    "GuidanceConfig",
    "GuidanceEngine",
    "GuidanceStats",
    "NoiseSchedule",
    "OptimizeResult",
    "SampleResult",
    "Sampler",
    "SigmaSchedule",
    "autoguidance",
    "from_diffusers",
    "from_module",
    "list_presets",
    "make_generators",
    "optimize",
    "preset",
    "sample",
    "smc",
    "with_techniques",
]
