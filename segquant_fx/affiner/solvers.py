r"""Per-step solvers: closed-form corrections of a quantized model's noise prediction.

Every solver sees pairs of predictions on the *same* backbone input, ``q`` (quantized) and ``r``
(float, the target), as ``[B, C, H, W]`` float tensors, one step at a time. It accumulates sufficient
statistics in float64 (:meth:`Solver.update`, so calibration streams over any number of batches and
gives the same result however the data is split), solves in closed form (:meth:`Solver.solve`, a
dict of tensors that is saved as is) and applies the solution (:meth:`Solver.apply`).

``mserel`` (SegQuant, spec §5.1)
    Per location (a latent channel at a block or a downsampled position) an affine map
    ``q -> K*q + b`` minimising, over every sample ``n`` and element of the location,

    .. math:: \operatorname{mean}_n A_n (K q_n + b - r_n)^2 + \lambda_1 (K-1)^2 + \lambda_2 b^2,
              \qquad A = \alpha + (1-\alpha)/(r^2 + \epsilon).

    Setting the gradient to zero gives a 2x2 system in the means
    :math:`m_{A}, m_{Aq}, m_{Aqq}, m_{Ar}, m_{Aqr}`:
    ``[[m_Aqq + l1, m_Aq], [m_Aq, m_A + l2]] @ [K, b] = [m_Aqr + l1, m_Ar]``, solved by Cramer's rule.
    With a single sample this is the reference's per-sample formula
    ``b = (r-q) / (1 + l2 q^2/l1 + l2/A)``, ``K = 1 + (l2 q / l1) b``; the reference then averages the
    per-sample ``(K, b)``, we minimise the mean objective over all samples instead (the exact
    minimiser of what it approximates). ``block`` mode pools the statistics over
    ``blocksize x blocksize`` blocks (a partial block at the edge pools what it has) and repeats the
    solution over the block; ``interpolate`` mode bilinearly downsamples ``q`` and ``r`` by
    ``blocksize`` (with antialiasing), solves per downsampled element and bilinearly upsamples
    ``K`` and ``b``.

``ptqd`` (PTQD, He et al., NeurIPS 2023)
    PTQD splits the quantization noise ``d = q - r`` into a part correlated with the float output
    and an uncorrelated residual: ``d = k*r + mu_c + u`` with one slope ``k`` per step and a mean
    ``mu_c`` per channel, fitted jointly by least squares (shared slope, per-channel intercepts).
    The correlated part and the bias are removed by ``c = (q - mu_c) / (1 + k) = r + u / (1 + k)``.
    PTQD absorbs the variance ``s_u^2 / (1+k)^2`` of what is left into the *sampler's* noise
    schedule: a stochastic step ``x' = a x + g eps + sigma z`` already adds ``sigma^2`` of fresh
    noise, so it calibrates ``sigma'^2 = max(sigma^2 - g^2 s_u^2 / (1+k)^2, 0)``
    (:func:`variance_schedule_calibration`). A deterministic sampler (DDIM with eta=0, the flow
    matching Euler steps of SD3/FLUX) adds no noise, so that variance has nowhere to go there and the
    residual simply inflates every step. ``variance_mode="shrink"`` (default) absorbs it into the
    estimate instead: the linear minimum-MSE estimate of ``r`` from ``c`` under PTQD's own noise model
    (``u`` uncorrelated with ``r``), per channel,
    ``r_hat = m_c + rho_c (c - m_c)``, ``rho_c = v_c / (v_c + s_u,c^2 / (1+k)^2)``,
    with ``m_c``, ``v_c`` the mean and variance of the float output. It minimises the expected
    per-step error, reduces to PTQD's correction when the residual vanishes, and never needs the
    scheduler (the stepper does not see it). ``variance_mode="none"`` is PTQD's correction only (the
    reference). The per-channel residual variance is kept in the solution (``residual_var``) for
    users of stochastic samplers.

``tac`` (TAC-Diffusion, Yao et al., ECCV 2024: timestep-aware correction of the noise estimate)
    Per step and channel a scale ``K`` for the large-magnitude elements of the quantized prediction
    (``|q| > threshold * mean|q|`` over the sample's channel), minimising over those elements
    ``(1-l1) mean((Kq-r)^2) + l1 mean(((Kq-r)/r)^2) + l2 (K-1)^2``, i.e.
    ``K = [(1-l1) m(qr) + l1 m(qr/r^2) + l2] / [(1-l1) m(q^2) + l1 m(q^2/r^2) + l2]``. Differences
    from the reference: it is fitted on exactly the elements it corrects (the reference fits on all,
    corrects some), the magnitude test is two-sided (the reference's one-sided ``q > ...`` ignores
    negative outliers) and, as for ``mserel``, the mean objective over all samples is minimised
    rather than per-sample solutions averaged. TAC's input-bias correction acts on the backbone's
    input, which a stepper cannot reach; the recurrent learning mode covers the drift it targets.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from segquant_fx.affiner.config import MSERelConfig, PTQDConfig, TACConfig
from segquant_fx.errors import CalibrationError, SerializationError

__all__ = [
    "Solver",
    "MSERelSolver",
    "PTQDSolver",
    "TACSolver",
    "SOLVERS",
    "blend",
    "variance_schedule_calibration",
]


def _check_pair(quant: torch.Tensor, real: torch.Tensor) -> None:
    if quant.dim() != 4 or quant.shape != real.shape:
        raise CalibrationError(
            "a solver needs two [B, C, H, W] predictions of the same shape, got "
            f"quant {tuple(quant.shape)} and real {tuple(real.shape)}"
        )
    if not (torch.isfinite(quant).all() and torch.isfinite(real).all()):
        raise CalibrationError("non-finite values in the predictions given to the affiner solver")


class Solver(abc.ABC):
    """One step's streaming least-squares fit (see the module docstring for the math)."""

    #: solver_type
    name: ClassVar[str]
    #: tensors a solution holds (checked when loading)
    solution_keys: ClassVar[tuple[str, ...]]

    def __init__(self, config: Any) -> None:
        self.config = config
        self.samples = 0
        self.channels: int | None = None

    def update(self, quant: torch.Tensor, real: torch.Tensor) -> None:
        """Add a batch of ``[B, C, H, W]`` prediction pairs to the statistics."""
        _check_pair(quant, real)
        if self.channels is None:
            self.channels = int(quant.shape[1])
        elif quant.shape[1] != self.channels:
            raise CalibrationError(
                f"predictions with {quant.shape[1]} channels after {self.channels}: one affiner step "
                "cannot mix models with different latent channels"
            )
        self._update(quant.float(), real.float())
        self.samples += int(quant.shape[0])

    @abc.abstractmethod
    def _update(self, quant: torch.Tensor, real: torch.Tensor) -> None: ...

    def solve(self) -> dict[str, torch.Tensor]:
        """The correction that minimises the objective over everything seen (float32, CPU)."""
        if self.samples == 0:
            raise CalibrationError(f"{self.name} solver has seen no samples; nothing to solve")
        return {k: v.float().cpu().contiguous() for k, v in self._solve().items()}

    @abc.abstractmethod
    def _solve(self) -> dict[str, torch.Tensor]: ...

    @classmethod
    @abc.abstractmethod
    def apply(cls, solution: Mapping[str, torch.Tensor], quant: torch.Tensor, config: Any) -> torch.Tensor:
        """Apply ``solution`` to a ``[B, C, H, W]`` float prediction."""

    @classmethod
    def check_solution(cls, solution: Mapping[str, torch.Tensor], where: str) -> None:
        """Raise SerializationError if ``solution`` lacks tensors or holds non-finite values."""
        missing = set(cls.solution_keys) - set(solution)
        extra = set(solution) - set(cls.solution_keys)
        if missing or extra:
            raise SerializationError(
                f"{where}: {cls.name} solution tensors {sorted(solution)} do not match "
                f"{sorted(cls.solution_keys)}"
            )
        for k, v in solution.items():
            if not torch.isfinite(v).all():
                raise SerializationError(f"{where}: tensor {k!r} holds non-finite values")

    @staticmethod
    def _channels_of(solution: Mapping[str, torch.Tensor], key: str, quant: torch.Tensor) -> None:
        c = solution[key].shape[0]
        if quant.dim() != 4 or quant.shape[1] != c:
            raise CalibrationError(
                f"the affiner was learned for {c} latent channels, got a prediction of shape "
                f"{tuple(quant.shape)} (as [B, C, H, W]); use an affiner learned on this model"
            )


# ----------------------------------------------------------------------------------------- mserel


def _grid(h: int, w: int, bs: int) -> tuple[int, int]:
    return max(1, math.ceil(h / bs)), max(1, math.ceil(w / bs))


class MSERelSolver(Solver):
    """SegQuant's blockwise / interpolated affine correction ``K*q + b`` (``solver_type="mserel"``)."""

    name = "mserel"
    solution_keys = ("K", "b")

    def __init__(self, config: MSERelConfig) -> None:
        super().__init__(config)
        self._sums: torch.Tensor | None = None  # [5, C, h, w] float64: A, Aq, Aqq, Ar, Aqr
        self._hw: tuple[int, int] | None = None

    def _update(self, quant: torch.Tensor, real: torch.Tensor) -> None:
        cfg = self.config
        h, w = quant.shape[-2:]
        if self._hw is None:
            self._hw = (int(h), int(w))
        elif self._hw != (h, w):
            raise CalibrationError(
                f"mserel: predictions of size {tuple(quant.shape[-2:])} after {self._hw}; calibrate one "
                "resolution at a time"
            )
        grid = _grid(int(h), int(w), cfg.blocksize)
        if cfg.sample_mode == "interpolate" and grid != (h, w):
            quant = F.interpolate(quant, size=grid, mode="bilinear", align_corners=False, antialias=True)
            real = F.interpolate(real, size=grid, mode="bilinear", align_corners=False, antialias=True)
        a = cfg.alpha + (1.0 - cfg.alpha) / (real * real + cfg.eps)
        aq = a * quant
        stats = torch.stack([a, aq, aq * quant, a * real, aq * real], dim=1)  # [B, 5, C, h, w]
        if cfg.sample_mode == "block" and cfg.blocksize > 1:
            b5 = stats.shape[:3]
            flat = stats.reshape(-1, *stats.shape[-2:])
            pooled = F.avg_pool2d(flat.unsqueeze(1), cfg.blocksize, cfg.blocksize, ceil_mode=True)
            stats = pooled.reshape(*b5, *pooled.shape[-2:])
        batch_sum = stats.double().sum(0).cpu()
        self._sums = batch_sum if self._sums is None else self._sums + batch_sum

    def _solve(self) -> dict[str, torch.Tensor]:
        assert self._sums is not None
        m_a, m_aq, m_aqq, m_ar, m_aqr = (self._sums / self.samples).unbind(0)
        l1, l2 = self.config.lambda1, self.config.lambda2
        a11, a12, a22 = m_aqq + l1, m_aq, m_a + l2
        y1, y2 = m_aqr + l1, m_ar
        det = a11 * a22 - a12 * a12
        # det > 0 unless q is constant at a location and both regularisers are 0: keep identity there
        ok = det > 1e-12 * (a11 * a22).clamp_min(1e-300)
        safe = torch.where(ok, det, torch.ones_like(det))
        k = torch.where(ok, (y1 * a22 - a12 * y2) / safe, torch.ones_like(det))
        b = torch.where(ok, (a11 * y2 - a12 * y1) / safe, torch.zeros_like(det))
        return {"K": k, "b": b}

    @classmethod
    def expand(cls, param: torch.Tensor, hw: tuple[int, int], config: MSERelConfig) -> torch.Tensor:
        """A ``[C, h, w]`` solution tensor at full resolution ``[1, C, H, W]``."""
        h, w = hw
        p = param.unsqueeze(0)
        if p.shape[-2:] == (h, w):
            return p
        if config.sample_mode == "interpolate":
            return F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
        bs = config.blocksize
        if p.shape[-2:] == _grid(h, w, bs):
            return p.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :h, :w]
        # another resolution than the calibration's: the block grid no longer lines up
        return F.interpolate(p, size=(h, w), mode="nearest")

    @classmethod
    def apply(
        cls, solution: Mapping[str, torch.Tensor], quant: torch.Tensor, config: MSERelConfig
    ) -> torch.Tensor:
        """``K*q + b`` with ``K`` and ``b`` brought to the prediction's resolution."""
        cls._channels_of(solution, "K", quant)
        hw = (int(quant.shape[-2]), int(quant.shape[-1]))
        k = cls.expand(solution["K"].to(quant), hw, config)
        b = cls.expand(solution["b"].to(quant), hw, config)
        return k * quant + b


# ------------------------------------------------------------------------------------------- ptqd


class PTQDSolver(Solver):
    """PTQD's correlated-noise + bias correction, with the uncorrelated variance absorbed (``"ptqd"``)."""

    name = "ptqd"
    solution_keys = ("k", "mu", "mean", "rho", "residual_var")

    def __init__(self, config: PTQDConfig) -> None:
        super().__init__(config)
        self._sums: torch.Tensor | None = None  # [6, C]: n, r, d, rr, rd, dd

    def _update(self, quant: torch.Tensor, real: torch.Tensor) -> None:
        r = real.double()
        d = quant.double() - r
        dims = (0, 2, 3)
        n = torch.full((r.shape[1],), float(r.numel() // r.shape[1]), dtype=torch.float64, device=r.device)
        s = torch.stack(
            [n, r.sum(dims), d.sum(dims), (r * r).sum(dims), (r * d).sum(dims), (d * d).sum(dims)]
        )
        s = s.cpu()
        self._sums = s if self._sums is None else self._sums + s

    def _solve(self) -> dict[str, torch.Tensor]:
        assert self._sums is not None
        n, sr, sd, srr, srd, sdd = self._sums.unbind(0)
        mr, md = sr / n, sd / n
        sxx = (srr - n * mr * mr).clamp_min(0)
        sxy = srd - n * mr * md
        syy = (sdd - n * md * md).clamp_min(0)
        total = sxx.sum()
        k = (sxy.sum() / total) if total > 0 else torch.zeros((), dtype=torch.float64)
        if not 1.0 + float(k) > 0.05:
            raise CalibrationError(
                f"ptqd: the fitted slope of the quantization noise on the float output is k={float(k):.3g}, "
                "so (1 + k) is not positive; the quantized model does not track the float one at this "
                "step (check the quantized backbone)"
            )
        mu = md - k * mr
        resid = ((syy - 2 * k * sxy + k * k * sxx) / n).clamp_min(0)
        noise_var = resid / (1.0 + k) ** 2
        var_r = sxx / n
        if self.config.variance_mode == "shrink":
            den = var_r + noise_var
            rho = torch.where(den > 0, var_r / den.clamp_min(1e-300), torch.ones_like(den))
        else:
            rho = torch.ones_like(var_r)
        return {"k": k.reshape(1), "mu": mu, "mean": mr, "rho": rho, "residual_var": noise_var}

    @classmethod
    def apply(
        cls, solution: Mapping[str, torch.Tensor], quant: torch.Tensor, config: PTQDConfig
    ) -> torch.Tensor:
        """``m + rho * ((q - mu) / (1 + k) - m)`` per channel."""
        cls._channels_of(solution, "mu", quant)

        def col(t: torch.Tensor) -> torch.Tensor:
            return t.to(quant).view(1, -1, 1, 1)

        k = solution["k"].to(quant).reshape(())
        c = (quant - col(solution["mu"])) / (1.0 + k)
        mean = col(solution["mean"])
        return mean + col(solution["rho"]) * (c - mean)


def variance_schedule_calibration(
    sigma: float | torch.Tensor, noise_coeff: float | torch.Tensor, residual_var: float | torch.Tensor
) -> torch.Tensor:
    """PTQD's variance-schedule calibration for a *stochastic* sampler step.

    A step ``x' = a*x + noise_coeff*eps + sigma*z`` with a corrected prediction carrying uncorrelated
    noise of variance ``residual_var`` (a ``ptqd`` solution's ``residual_var``, per channel) already
    receives ``noise_coeff**2 * residual_var`` of noise from the model, so the sampler should add
    only ``sigma'**2 = max(sigma**2 - noise_coeff**2 * residual_var, 0)``. Returns ``sigma'``.
    Deterministic samplers (``sigma = 0``) get 0: see the module docstring for what ``ptqd`` does there.
    """
    s = torch.as_tensor(sigma, dtype=torch.float64)
    g = torch.as_tensor(noise_coeff, dtype=torch.float64)
    v = torch.as_tensor(residual_var, dtype=torch.float64)
    if (s < 0).any() or (v < 0).any():
        raise CalibrationError(f"sigma={sigma!r} and residual_var={residual_var!r} must be non-negative")
    return (s * s - g * g * v).clamp_min(0).sqrt()


# -------------------------------------------------------------------------------------------- tac


def tac_mask(quant: torch.Tensor, threshold: float) -> torch.Tensor:
    """Elements TAC corrects: ``|q| > threshold * mean|q|`` per sample and channel."""
    mag = quant.abs()
    return mag > threshold * mag.mean(dim=(2, 3), keepdim=True)


class TACSolver(Solver):
    """TAC-Diffusion's per-channel scale of the large-magnitude elements (``solver_type="tac"``)."""

    name = "tac"
    solution_keys = ("K",)

    def __init__(self, config: TACConfig) -> None:
        super().__init__(config)
        self._sums: torch.Tensor | None = None  # [5, C]: n, qr, wqr, qq, wqq

    def _update(self, quant: torch.Tensor, real: torch.Tensor) -> None:
        m = tac_mask(quant, self.config.threshold).double()
        q, r = quant.double(), real.double()
        w = 1.0 / (r * r + self.config.eps)
        dims = (0, 2, 3)
        mq = m * q
        s = torch.stack(
            [
                m.sum(dims),
                (mq * r).sum(dims),
                (mq * r * w).sum(dims),
                (mq * q).sum(dims),
                (mq * q * w).sum(dims),
            ]
        )
        s = s.cpu()
        self._sums = s if self._sums is None else self._sums + s

    def _solve(self) -> dict[str, torch.Tensor]:
        assert self._sums is not None
        n, sqr, swqr, sqq, swqq = self._sums.unbind(0)
        l1, l2 = self.config.lambda1, self.config.lambda2
        safe_n = n.clamp_min(1)
        num = (1 - l1) * sqr / safe_n + l1 * swqr / safe_n + l2
        den = (1 - l1) * sqq / safe_n + l1 * swqq / safe_n + l2
        ok = (n > 0) & (den > 0)
        k = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.ones_like(den))
        return {"K": k}

    @classmethod
    def apply(
        cls, solution: Mapping[str, torch.Tensor], quant: torch.Tensor, config: TACConfig
    ) -> torch.Tensor:
        """``K_c * q`` on the large-magnitude elements, ``q`` elsewhere."""
        cls._channels_of(solution, "K", quant)
        k = solution["K"].to(quant).view(1, -1, 1, 1)
        return torch.where(tac_mask(quant, config.threshold), k * quant, quant)


#: solver_type -> solver class
SOLVERS: Mapping[str, type[Solver]] = {"mserel": MSERelSolver, "ptqd": PTQDSolver, "tac": TACSolver}


# ------------------------------------------------------------------------------------------ blend


def blend(
    quant: torch.Tensor,
    corrected: torch.Tensor,
    *,
    percentile: float = 100.0,
    greater: bool = True,
    scale: float = 1.0,
) -> torch.Tensor:
    """Blend a correction into the prediction (SegQuant's ``affine_with_percentile_scale``).

    Only ``percentile`` % of each sample's elements are corrected: those of largest ``|quant|`` if
    ``greater`` else those of smallest (ties at the threshold are included); 100 corrects all and 0
    none. The corrected elements become ``(1 - scale) * quant + scale * corrected``.
    """
    if scale == 1.0 and percentile >= 100.0:
        return corrected
    out = quant + scale * (corrected - quant)
    if percentile >= 100.0:
        return out
    if percentile <= 0.0:
        return quant
    b = quant.shape[0]
    mag = quant.abs().reshape(b, -1)
    n = mag.shape[1]
    count = max(1, min(n, round(n * percentile / 100.0)))
    if greater:
        thr = torch.kthvalue(mag, n - count + 1, dim=1).values
        mask = mag >= thr[:, None]
    else:
        thr = torch.kthvalue(mag, count, dim=1).values
        mask = mag <= thr[:, None]
    return torch.where(mask.reshape(quant.shape), out, quant)
