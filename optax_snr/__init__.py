"""optax_snr: Adam read as a pseudo signal-to-noise ratio, built from Optax stages.

Each stage is one :class:`optax.GradientTransformation`, chained with
:func:`optax.chain`::

    ema_moments       signal m and noise v: EMAs of g and |g|^2
    bias_correction   m_hat, v_hat: undo the zero initialization; owns ``count``
    scale_by_snr      m_hat / (sqrt(v_hat) + eps)
    optax.scale_by_learning_rate

:func:`adam` is that chain, a bit-exact drop-in for :func:`optax.adam`.
"""

from optax_snr.common.chain_as import chain_as as chain_as
from optax_snr.common.dtypes import compute_dtype as compute_dtype
from optax_snr.common.moments import Moments as Moments
from optax_snr.guards.skip_nonfinite import SkipNonfiniteState as SkipNonfiniteState
from optax_snr.guards.skip_nonfinite import skip_nonfinite as skip_nonfinite
from optax_snr.kernels.fused_adam import FusedAdam as FusedAdam
from optax_snr.kernels.fused_adam import fused_adam as fused_adam
from optax_snr.optimizers.adabelief import adabelief as adabelief
from optax_snr.optimizers.adam import adam as adam
from optax_snr.optimizers.adam import scale_by_adam as scale_by_adam
from optax_snr.optimizers.adamw import adamw as adamw
from optax_snr.optimizers.ademamix import ademamix as ademamix
from optax_snr.optimizers.adopt import adopt as adopt
from optax_snr.optimizers.amsgrad import amsgrad as amsgrad
from optax_snr.optimizers.nadam import nadam as nadam
from optax_snr.optimizers.nadam import nadamw as nadamw
from optax_snr.readers.diagnostics import SnrDiagnostics as SnrDiagnostics
from optax_snr.readers.diagnostics import SnrSummary as SnrSummary
from optax_snr.readers.diagnostics import Summary as Summary
from optax_snr.readers.diagnostics import flatten_diagnostics as flatten_diagnostics
from optax_snr.readers.diagnostics import snr_diagnostics as snr_diagnostics
from optax_snr.readers.noise_scale import NoiseScale as NoiseScale
from optax_snr.readers.noise_scale import NoiseScaleLeaf as NoiseScaleLeaf
from optax_snr.readers.noise_scale import noise_scale as noise_scale
from optax_snr.readers.plot import plot_diagnostics as plot_diagnostics
from optax_snr.stages.bias_correction import BiasCorrectionState as BiasCorrectionState
from optax_snr.stages.bias_correction import bias_correction as bias_correction
from optax_snr.stages.centered_moments import CenteredMomentsState as CenteredMomentsState
from optax_snr.stages.centered_moments import centered_moments as centered_moments
from optax_snr.stages.ema_moments import EmaMomentsState as EmaMomentsState
from optax_snr.stages.ema_moments import ema_moments as ema_moments
from optax_snr.stages.max_noise import MaxNoiseState as MaxNoiseState
from optax_snr.stages.max_noise import max_noise as max_noise
from optax_snr.stages.mixed_signal import MixedSignalState as MixedSignalState
from optax_snr.stages.mixed_signal import mixed_signal as mixed_signal
from optax_snr.stages.scale_by_adopt import ScaleByAdoptState as ScaleByAdoptState
from optax_snr.stages.scale_by_adopt import scale_by_adopt as scale_by_adopt
from optax_snr.stages.scale_by_snr import scale_by_snr as scale_by_snr
from optax_snr.storage.base import StorageFormat as StorageFormat
from optax_snr.storage.base import decode_moments as decode_moments
from optax_snr.storage.factored import FactoredMoment as FactoredMoment
from optax_snr.storage.factored import factored as factored
from optax_snr.storage.quantized import QuantizedMoment as QuantizedMoment
from optax_snr.storage.quantized import quantized as quantized
from optax_snr.storage.stochastic_rounding import RoundedMoment as RoundedMoment
from optax_snr.storage.stochastic_rounding import stochastic_rounding as stochastic_rounding

__version__ = "0.1.0"

__all__ = [
    "BiasCorrectionState",
    "CenteredMomentsState",
    "EmaMomentsState",
    "FactoredMoment",
    "FusedAdam",
    "MaxNoiseState",
    "MixedSignalState",
    "Moments",
    "NoiseScale",
    "NoiseScaleLeaf",
    "QuantizedMoment",
    "RoundedMoment",
    "ScaleByAdoptState",
    "SkipNonfiniteState",
    "SnrDiagnostics",
    "SnrSummary",
    "StorageFormat",
    "Summary",
    "adabelief",
    "adam",
    "adamw",
    "ademamix",
    "adopt",
    "amsgrad",
    "bias_correction",
    "centered_moments",
    "chain_as",
    "compute_dtype",
    "decode_moments",
    "ema_moments",
    "factored",
    "flatten_diagnostics",
    "fused_adam",
    "max_noise",
    "mixed_signal",
    "nadam",
    "nadamw",
    "noise_scale",
    "plot_diagnostics",
    "quantized",
    "scale_by_adam",
    "scale_by_adopt",
    "scale_by_snr",
    "skip_nonfinite",
    "snr_diagnostics",
    "stochastic_rounding",
]
