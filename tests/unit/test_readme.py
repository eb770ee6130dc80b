"""The README's user-pattern example runs as written and finds what it claims (in under 30 lines)."""

from __future__ import annotations

import pathlib
import re

import torch

from segquant_fx.patterns import PATTERNS, unregister_pattern
from segquant_fx.report import find_patterns

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def _example_code() -> str:
    text = README.read_text()
    block = text.split("<!-- user-pattern-example -->", 1)[1].split("<!-- end-user-pattern-example -->", 1)[0]
    return re.search(r"```python\n(.*?)```", block, re.S).group(1)


class TimmStyleAttention(torch.nn.Module):
    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(-3)
        o = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(o.transpose(1, 2).flatten(-2))


def test_readme_user_pattern_runs_and_matches():
    code = _example_code()
    assert len(code.strip().splitlines()) < 30
    try:
        exec(compile(code, str(README), "exec"), {})
        assert "fused_qkv_unflatten" in PATTERNS
        r = find_patterns(TimmStyleAttention(), (torch.randn(2, 5, 16),), debug=True)
        assert r.counts["fused_qkv_unflatten"] == 1
        assert r.layers["qkv"].output_segments == (16, 16, 16)
        assert r.layers["qkv"].patterns == ("fused_qkv_unflatten",)
        assert r.layers["proj"].input_segments == (8, 8)  # the built-in head merge still applies
    finally:
        unregister_pattern("fused_qkv_unflatten")


def test_readme_quickstart_commands_are_the_ci_ones():
    text = README.read_text()
    assert "segquant-fx quantize " in text
    assert "python -m pytest tests -q" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python3 -m pytest tests -q" in ci
