"""find_patterns on the tiny diffusers models: the issue's "done when" classification, exactly."""

from __future__ import annotations

import json

import pytest

from segquant_fx.errors import PatternError
from segquant_fx.report import find_patterns


def _layers(report, suffix):
    return {n: p for n, p in report.layers.items() if n.endswith(suffix)}


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-sd35"])
def test_sd3_family_classification(zoo, name):
    _, _, _, r = zoo(name)
    # adaLN modulation linears: output segments + DualScale (SiLU input)
    mods = {n: p for n, p in r.layers.items() if n.endswith(("norm1.linear", "norm1_context.linear", "norm_out.linear"))}
    assert len(mods) == 5
    for n, p in mods.items():
        assert p.dual_scale and p.output_segments and len(set(p.output_segments)) == 1, n
    expected = {"transformer_blocks.0.norm1.linear": 9 if name == "tiny-sd35" else 6,
                "transformer_blocks.0.norm1_context.linear": 6,
                "transformer_blocks.1.norm1.linear": 6,
                "transformer_blocks.1.norm1_context.linear": 2,  # context_pre_only: AdaLayerNormContinuous
                "norm_out.linear": 2}
    assert {n: len(p.output_segments) for n, p in mods.items()} == expected
    # attention output projections: per-head input segments
    outs = {n: p for n, p in r.layers.items() if n.endswith(("to_out.0", "to_add_out"))}
    assert len(outs) == (4 if name == "tiny-sd35" else 3)
    assert all(p.input_segments == (8, 8, 8, 8) and p.patterns == ("reshape_to_linear",) for p in outs.values())
    # FFN down-projections and embedding MLP second linears: DualScale
    for n in ["transformer_blocks.0.ff.net.2", "transformer_blocks.0.ff_context.net.2", "transformer_blocks.1.ff.net.2",
              "time_text_embed.timestep_embedder.linear_2", "time_text_embed.text_embedder.linear_2"]:
        assert r.layers[n].dual_scale and r.layers[n].patterns == ("activation_to_linear",), n
    # q/k/v projections and proj_out are plain
    for n, p in r.layers.items():
        if n.endswith(("to_q", "to_k", "to_v", "add_q_proj", "proj_out", "context_embedder")):
            assert p.patterns == () and not p.dual_scale, n
    assert r.counts["activation_to_linear"] == 10
    assert r.counts["concat_to_linear"] == 1  # sinusoidal timestep [sin, cos] into linear_1


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-flux-fused"])
def test_flux_classification(zoo, name):
    _, _, _, r = zoo(name)
    po = r.layers["single_transformer_blocks.0.proj_out"]
    assert po.input_segments == (32, 128)  # [attention 32, MLP 4*32]: unequal segments
    assert po.dual_scale and po.dual_scale_segments == (False, True)
    assert set(po.patterns) == {"concat_to_linear", "activation_to_linear"}
    for blk in ("transformer_blocks.0", "transformer_blocks.1"):
        assert r.layers[f"{blk}.norm1.linear"].output_segments == (32,) * 6
        assert r.layers[f"{blk}.norm1_context.linear"].output_segments == (32,) * 6
        assert r.layers[f"{blk}.attn.to_out.0"].input_segments == (8,) * 4
        assert r.layers[f"{blk}.attn.to_add_out"].input_segments == (8,) * 4
        assert r.layers[f"{blk}.ff.net.2"].dual_scale
    assert r.layers["single_transformer_blocks.1.norm.linear"].output_segments == (32,) * 3
    assert r.layers["norm_out.linear"].output_segments == (32, 32)
    for n in ("timestep_embedder", "guidance_embedder", "text_embedder"):
        assert r.layers[f"time_text_embed.{n}.linear_2"].dual_scale
    if name == "tiny-flux-fused":
        assert r.layers["transformer_blocks.0.attn.to_qkv"].output_segments == (32, 32, 32)
        assert r.layers["transformer_blocks.0.attn.to_added_qkv"].output_segments == (32, 32, 32)
        assert r.layers["single_transformer_blocks.0.attn.to_qkv"].output_segments == (32, 32, 32)
        assert r.counts["linear_to_chunk"] == 13
    else:
        assert r.counts["linear_to_chunk"] == 7


def test_sdxl_classification(zoo):
    _, _, _, r = zoo("tiny-sdxl")
    assert r.layers["add_embedding.linear_1"].input_segments == (16, 48)  # [text_embeds, 6 x 8 time embeds]
    assert r.layers["time_embedding.linear_2"].dual_scale
    assert r.layers["add_embedding.linear_2"].dual_scale
    geglu = _layers(r, "ff.net.0.proj")
    assert geglu and all(p.output_segments == (256, 256) for p in geglu.values())
    down = _layers(r, "ff.net.2")
    assert down and all(p.dual_scale for p in down.values())
    outs = _layers(r, "to_out.0")
    assert len(outs) == 16 and all(p.input_segments == (16,) * 4 for p in outs.values())
    temb = _layers(r, "time_emb_proj")
    assert temb and all(p.dual_scale for p in temb.values())
    # skip-connection concats into conv_shortcut are reported, not planned
    assert set(r.convs) == {n for n in r.convs if n.startswith("up_blocks") and n.endswith("conv_shortcut")}
    assert r.counts["concat_to_conv"] == len(r.convs) >= 1


@pytest.mark.parametrize("name", ["tiny-sd3-controlnet", "tiny-flux-controlnet"])
def test_controlnets_have_segquant_layers(zoo, name):
    _, _, _, r = zoo(name)
    assert r.counts["linear_to_chunk"] >= 3
    assert r.counts["reshape_to_linear"] >= 2
    assert r.counts["activation_to_linear"] >= 9


def test_every_linear_is_in_the_report(zoo):
    model, _, _, r = zoo("tiny-flux")
    import torch

    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(r.layers) == names
    for p in r.layers.values():
        if p.output_segments:
            assert sum(p.output_segments) == p.out_features
        if p.input_segments:
            assert sum(p.input_segments) == p.in_features


def test_report_serializations(zoo):
    _, _, _, r = zoo("tiny-sd3")
    d = json.loads(r.to_json())
    assert d["counts"] == r.counts
    assert d["layers"]["norm_out.linear"]["output_segments"] == [32, 32]
    md = r.to_markdown()
    assert "| norm_out.linear | 32x64 | linear_to_chunk, activation_to_linear | 32+32 | - | yes |" in md
    assert "| transformer_blocks.0.attn.to_out.0 | 32x32 | reshape_to_linear | - | 4x8 | - |" in md


def test_pattern_subset_and_unknown_name(zoo):
    _, _, cm, _ = zoo("tiny-sd3")
    r = find_patterns(cm, patterns=["reshape_to_linear"])
    assert set(r.counts) == {"reshape_to_linear"}
    assert all(p.patterns in ((), ("reshape_to_linear",)) for p in r.layers.values())
    with pytest.raises(PatternError, match="unknown pattern 'nope'; registered: linear_to_chunk"):
        find_patterns(cm, patterns=["nope"])


def test_module_needs_example():
    import torch

    with pytest.raises(PatternError, match="needs example inputs"):
        find_patterns(torch.nn.Linear(2, 2))


def test_shared_module_with_different_plans_falls_back():
    """A module called from two places with different segmentations is planned as one segment."""
    import torch
    import torch.nn.functional as F

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            a, b = self.lin(x).chunk(2, -1)
            return self.lin(F.silu(torch.cat([a, b], -1))) + 1

    r = find_patterns(Shared(), (torch.randn(2, 8),))
    p = r.layers["lin"]
    assert len(p.nodes) == 2
    assert p.output_segments is None and not p.dual_scale
    assert "different plans" in p.notes[0]
