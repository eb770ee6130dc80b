"""GPTQ weight rounding, batched over problems of the same shape.

A problem is one weight block ``W`` ``[n, K]`` to round onto an integer grid, with the Hessian
``H = 2/m sum x x^T`` (``[K, K]``) of the inputs it sees. GPTQ rounds the columns one after the
other and spreads each column's rounding error over the columns not yet rounded, weighted by the
inverse Hessian (an upper Cholesky factor ``U`` of ``H^-1``), so the layer output error
``||X W^T - X Q^T||`` stays small. Columns are processed in blocks of ``blocksize`` with lazy
updates of the columns after the block.

Design choices:

* **Scales.** Per-channel, per-tensor and per-(channel, input segment) scales are fixed from the
  weight's amax before the column loop. Group-wise scales are fixed before the loop with
  ``static_groups`` (and always with act-order, so that every column keeps its own group); otherwise
  each group's scale is taken when the loop reaches the group's first column, from the current
  (already error-updated) values of the group's columns.
* **Exact codes.** Codes are ``clamp(round_half_even(w / s), qmin, qmax)`` with an IEEE float32
  division, the arithmetic of ``segquant::quantize``; the returned int8 codes are stored as they are
  (int4 packed), so the stored weight is exactly GPTQ's choice and ``quantize(q * s, s) == q``.
* **Dead inputs.** A column whose Hessian diagonal is 0 (input channel never active) gets
  ``H_jj = 1``: it is rounded to nearest and spreads no error (its weights are kept, not zeroed).
* **Damping.** ``H + d I`` with ``d = percdamp * mean(diag H)``; if the Cholesky factorizations
  fail, ``d`` is multiplied by 10 and retried, up to 10 times, then the problem falls back to
  round-to-nearest with a warning.
* **Batching.** Problems with the same ``(n, K)`` and settings run together: every step is a
  batched tensor op, so the Python column loop runs once per batch, not once per layer.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from segquant_fx.ops.formats import qtype_info, scale_from_amax

__all__ = ["GPTQResult", "gptq_quantize", "MAX_DAMP_RETRIES"]

#: Damping retries (x10 each) before falling back to round-to-nearest.
MAX_DAMP_RETRIES = 10
#: Largest sub-batch of Hessians factorized at once (bytes).
_FACTOR_BYTES = 1 << 30


@dataclass
class GPTQResult:
    """Output of :func:`gptq_quantize` for a batch of ``L`` problems.

    Attributes:
        codes: int8 codes ``[L, n, K]``.
        scale: Dequant scales ``[L, n, S]`` (``S`` scale columns).
        damp: Damping used per problem (``nan`` where round-to-nearest was used).
        fallback: Per problem, True where GPTQ fell back to round-to-nearest.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    damp: list[float]
    fallback: list[bool]


def _inverse_factors(
    h: torch.Tensor, percdamp: float, names: Sequence[str]
) -> tuple[torch.Tensor, list[float], list[bool]]:
    """Upper Cholesky factors of ``(H + d I)^-1`` per problem, with damping retries.

    Factorizes sub-batches of at most ``_FACTOR_BYTES`` so that the temporaries stay small.
    """
    nprob, k = h.shape[0], h.shape[-1]
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    mean_diag = h.diagonal(dim1=-2, dim2=-1).mean(-1)
    damp = (percdamp * mean_diag).clamp(min=1e-12)
    out = torch.zeros_like(h)
    ok = torch.zeros(nprob, dtype=torch.bool, device=h.device)
    used = [float("nan")] * nprob
    per = max(1, _FACTOR_BYTES // (k * k * h.element_size()))
    for _attempt in range(MAX_DAMP_RETRIES + 1):
        todo = (~ok).nonzero().flatten()
        if todo.numel() == 0:
            break
        for chunk in todo.split(per):
            hd = h[chunk] + damp[chunk, None, None] * eye
            lower, info = torch.linalg.cholesky_ex(hd)
            del hd
            inv = torch.cholesky_inverse(lower)
            del lower
            upper, info2 = torch.linalg.cholesky_ex(inv, upper=True)
            del inv
            good = (info == 0) & (info2 == 0) & torch.isfinite(upper).flatten(1).all(1)
            idx = chunk[good]
            out[idx] = upper[good]
            del upper
            for i, d in zip(idx.tolist(), damp[idx].tolist(), strict=True):
                used[i] = d
            ok[idx] = True
            damp[chunk[~good]] *= 10.0
    failed = (~ok).tolist()
    for i, bad in enumerate(failed):
        if bad:
            warnings.warn(
                f"GPTQ: the Hessian of {names[i] if i < len(names) else f'problem {i}'} stays singular after "
                f"{MAX_DAMP_RETRIES} damping retries (x10 each); rounding this weight to nearest instead",
                RuntimeWarning,
                stacklevel=3,
            )
    return out, used, failed


@torch.no_grad()
def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    qtype: str,
    *,
    scale: torch.Tensor | None = None,
    scale_index: torch.Tensor | None = None,
    group_size: int | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    actorder: bool = False,
    names: Sequence[str] = (),
) -> GPTQResult:
    """Round ``L`` weight blocks with GPTQ.

    Args:
        w: Weights ``[L, n, K]`` (float; computed in float32).
        h: Hessians ``[L, K, K]`` (float32 or float64; the factorization runs in this dtype).
        qtype: ``"int8"`` or ``"int4"``.
        scale: Static scales ``[L, n, S]``; column ``j`` uses ``scale[..., scale_index[j]]``. None:
            dynamic groups of ``group_size`` (scales taken when the loop reaches each group).
        scale_index: ``[K]`` column -> scale column (default: all 0).
        group_size: Group size for dynamic groups (``scale`` None); not with ``actorder``.
        blocksize: Columns per lazy-update block.
        percdamp: Initial damping as a fraction of the mean Hessian diagonal.
        actorder: Process columns by decreasing Hessian diagonal.
        names: Problem names for warnings.

    Returns:
        A :class:`GPTQResult`.
    """
    info = qtype_info(qtype)
    if info.is_float:
        raise ValueError("GPTQ rounds integer weights only")
    qmin, qmax = info.qmin, info.qmax
    nprob, n, k = w.shape
    dev = w.device
    W = w.to(torch.float32).clone()
    H = h  # not modified in place (copied below where it must change)
    dynamic = scale is None
    if dynamic:
        if group_size is None or k % group_size:
            raise ValueError("dynamic GPTQ groups need a group_size dividing K")
        if actorder:
            raise ValueError("act-order needs static scales (static groups)")
        S = torch.zeros(nprob, n, k // group_size, dtype=torch.float32, device=dev)
        col_scale = torch.arange(k, device=dev) // group_size
    else:
        S = scale.to(device=dev, dtype=torch.float32).expand(nprob, n, -1).clone()
        col_scale = (
            scale_index.to(dev) if scale_index is not None else torch.zeros(k, dtype=torch.long, device=dev)
        )
    dead = H.diagonal(dim1=-2, dim2=-1) == 0
    if bool(dead.any()):
        H = H.clone()
        H.diagonal(dim1=-2, dim2=-1)[dead] = 1.0
    diag = H.diagonal(dim1=-2, dim2=-1)
    perm = None
    if actorder:
        perm = torch.argsort(diag, dim=-1, descending=True)  # [L, K]
        W = torch.take_along_dim(W, perm[:, None, :], dim=2)
        H = torch.take_along_dim(torch.take_along_dim(H, perm[:, :, None], dim=1), perm[:, None, :], dim=2)
        col_scale_p = torch.take_along_dim(col_scale[None, :].expand(nprob, -1), perm, dim=1)  # [L, K]
    else:
        col_scale_p = col_scale[None, :].expand(nprob, -1)
    U, damp, failed = _inverse_factors(H, percdamp, names)
    del H
    U = U.to(torch.float32)
    Q = torch.zeros(nprob, n, k, dtype=torch.int8, device=dev)
    fb = torch.tensor(failed, device=dev)
    if bool(fb.any()):  # singular Hessians: no error feedback for those problems
        U[fb] = torch.eye(k, device=dev)
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        W1 = W[:, :, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if dynamic and col % group_size == 0:
                span = torch.cat([W1[:, :, i:], W[:, :, i2:]], dim=2)[:, :, :group_size]
                S[:, :, col // group_size] = scale_from_amax(span.abs().amax(dim=2), qtype)
            s = torch.take_along_dim(S, col_scale_p[:, None, col : col + 1].expand(-1, n, 1), dim=2)[:, :, 0]
            x = W1[:, :, i]
            q = torch.round(x / s).clamp_(qmin, qmax)
            Q[:, :, col] = q.to(torch.int8)
            err = (x - q * s) / U1[:, i, i][:, None]
            W1[:, :, i:] -= err[:, :, None] * U1[:, None, i, i:]
            E1[:, :, i] = err
        if i2 < k:
            W[:, :, i2:] -= torch.bmm(E1, U[:, i1:i2, i2:])
    if perm is not None:
        Q = torch.empty_like(Q).scatter_(2, perm[:, None, :].expand(-1, n, -1), Q)
    return GPTQResult(codes=Q, scale=S, damp=damp, fallback=failed)
