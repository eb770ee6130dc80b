"""Optimizers and calibrators that turn calibration statistics into quantized layers.

* SmoothQuant with a per-segment alpha search
  (:mod:`~segquant_fx.optim.search`), scored layer-locally on reservoir samples of each layer's inputs;
* SVDQuant low-rank branches (:mod:`~segquant_fx.optim.svd`);
* GPTQ weight rounding, batched over layers (:mod:`~segquant_fx.optim.gptq`);
* activation calibrators ``amax`` / ``percentile`` / ``mse`` (:mod:`~segquant_fx.optim.calibrators`).

:func:`optimize` (:mod:`~segquant_fx.optim.pipeline`) runs them all between calibration and the
rewrite; ``segquant_fx.quantize`` calls it.
"""

from segquant_fx.optim.calibrators import ActivationCalibrator, hist_mse_amax, hist_percentile
from segquant_fx.optim.gptq import GPTQResult, gptq_quantize
from segquant_fx.optim.pipeline import OptimizeReport, optimize
from segquant_fx.optim.search import SearchState
from segquant_fx.optim.svd import fold_smoothing, low_rank_split

__all__ = [
    "optimize",
    "OptimizeReport",
    "SearchState",
    "ActivationCalibrator",
    "hist_percentile",
    "hist_mse_amax",
    "gptq_quantize",
    "GPTQResult",
    "low_rank_split",
    "fold_smoothing",
]
