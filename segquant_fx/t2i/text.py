"""A tiny word-level text encoder, trained jointly with each denoiser.

Token ids come from :func:`segquant_fx.t2i.data.tokenize` (fixed vocabulary, fixed length
:data:`~segquant_fx.t2i.data.MAX_TOKENS`, id 0 pads). The encoder is a small pre-norm transformer with
learned positions; it returns per-token embeddings ``[B, T, token_dim]`` (the backbone's
``encoder_hidden_states``) and a pooled embedding ``[B, pooled_dim]`` (``pooled_projections`` /
``text_embeds``): the mean of the non-padding tokens' hidden states, projected. The empty prompt (all
padding, used for classifier-free guidance) pools to zeros before the projection.

Padding is not masked in attention, like SD3's T5 branch: the all-padding sequence must stay well defined.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from segquant_fx.errors import ConfigError
from segquant_fx.t2i.data import MAX_TOKENS, PAD_ID, VOCAB

__all__ = ["TextEncoderConfig", "TinyTextEncoder"]


@dataclass(frozen=True, kw_only=True)
class TextEncoderConfig:
    """Shape of a :class:`TinyTextEncoder`.

    Attributes:
        vocab_size: Number of token ids.
        max_tokens: Sequence length.
        width: Hidden size.
        layers: Transformer blocks.
        heads: Attention heads (must divide ``width``).
        token_dim: Size of the per-token output.
        pooled_dim: Size of the pooled output.
    """

    vocab_size: int = len(VOCAB)
    max_tokens: int = MAX_TOKENS
    width: int = 64
    layers: int = 2
    heads: int = 4
    token_dim: int = 128
    pooled_dim: int = 128

    def __post_init__(self) -> None:
        for k, v in asdict(self).items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"TextEncoderConfig.{k}={v!r} must be a positive int")
        if self.width % self.heads:
            raise ConfigError(f"TextEncoderConfig: heads={self.heads} must divide width={self.width}")

    def to_dict(self) -> dict[str, int]:
        """JSON-ready dict."""
        return asdict(self)


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyTextEncoder(nn.Module):
    """Word embeddings + a small transformer; ``forward(ids) -> (tokens, pooled)``."""

    def __init__(self, config: TextEncoderConfig | None = None) -> None:
        super().__init__()
        self.config = config or TextEncoderConfig()
        c = self.config
        self.embed = nn.Embedding(c.vocab_size, c.width)
        self.pos = nn.Parameter(torch.randn(c.max_tokens, c.width) * 0.02)
        self.blocks = nn.ModuleList(_Block(c.width, c.heads) for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.width)
        self.token_proj = nn.Linear(c.width, c.token_dim)
        self.pooled_proj = nn.Linear(c.width, c.pooled_dim)

    def forward(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode ``[B, T]`` token ids into ``([B, T, token_dim], [B, pooled_dim])``."""
        c = self.config
        if (
            token_ids.dim() != 2
            or token_ids.shape[1] != c.max_tokens
            or token_ids.dtype not in (torch.long, torch.int32)
        ):
            raise ConfigError(
                f"TinyTextEncoder expects integer token ids [B, {c.max_tokens}], got {token_ids.dtype} {tuple(token_ids.shape)}"
            )
        x = self.embed(token_ids) + self.pos
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        keep = (token_ids != PAD_ID).to(x.dtype)[..., None]
        pooled = (x * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return self.token_proj(x), self.pooled_proj(pooled)
