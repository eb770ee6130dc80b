"""SVDQuant: a rank-``r`` float branch absorbs the dominant part of the smoothed weight.

For a smoothed weight ``W_s = W * s`` (``[N, K]``, the layer computes ``y = (x / s) W_s^T``), the
truncated SVD ``W_s ~ U_r S_r V_r^T`` is the best rank-``r`` approximation (Eckart-Young). The
residual ``R = W_s - U_r S_r V_r^T`` is what gets quantized, and

    y = Q(x / s) Q(R)^T + (x / s) V_r S_r U_r^T

The branch is stored as two plain linear weights, ``down = sqrt(S_r) V_r^T / s`` (``[r, K]``: the
smoothing divisor is folded in, so the branch reads the layer's float input ``x`` directly) and
``up = U_r sqrt(S_r)`` (``[N, r]``), and runs in the activation dtype:
``y += linear(linear(x, down), up)`` (two ``aten.linear`` the compiler can fuse with the add).
"""

from __future__ import annotations

import torch

__all__ = ["low_rank_split", "fold_smoothing"]


def low_rank_split(
    w_s: torch.Tensor, rank: int, precision: str = "float64"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``w_s`` ``[N, K]`` into a rank-``rank`` part and a residual.

    Args:
        w_s: The (smoothed) weight, any float dtype.
        rank: ``r``; clipped to ``min(N, K)``.
        precision: ``"float64"`` or ``"float32"``: dtype of the SVD.

    Returns:
        ``(down_s, up, residual)``, float32: ``down_s`` ``[r, K]`` (smoothed domain, no fold),
        ``up`` ``[N, r]`` and ``residual = w_s - up @ down_s`` ``[N, K]``.
    """
    dt = torch.float64 if precision == "float64" else torch.float32
    w = w_s.detach().to(dt)
    r = max(0, min(int(rank), *w.shape))
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    root = sv[:r].sqrt()
    up = u[:, :r] * root[None, :]
    down = root[:, None] * vh[:r]
    residual = w - up @ down
    return down.to(torch.float32), up.to(torch.float32), residual.to(torch.float32)


def fold_smoothing(down_s: torch.Tensor, smooth: torch.Tensor | None) -> torch.Tensor:
    """``down_s / s`` along K: the branch then reads ``x`` instead of ``x / s``."""
    if smooth is None:
        return down_s
    return down_s / smooth.to(device=down_s.device, dtype=down_s.dtype)[None, :]
