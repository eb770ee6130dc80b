"""capture(): every named architecture, dynamic dims, the IR we match on, and clear errors."""

from __future__ import annotations

import pytest
import torch
from torch.utils import _pytree as pytree

from segquant_fx.capture import MODULE_KEY, capture, node_module, normalize_example
from segquant_fx.errors import CaptureError

ARCHS = [
    "tiny-sd3",
    "tiny-sd35",
    "tiny-flux",
    "tiny-flux-fused",
    "tiny-sdxl",
    "tiny-sd3-controlnet",
    "tiny-flux-controlnet",
]


def _first(out):
    return pytree.tree_leaves(out)[0]


# linears whose output the model computes and then drops: dead code, removed at capture
DEAD = {"tiny-sd3-controlnet": {"transformer_blocks.1.ff_context.net.2"}}


@pytest.mark.parametrize("name", ARCHS)
def test_every_architecture_captures_and_reproduces_eager(zoo, name):
    model, example, cm, _ = zoo(name)
    linears = [n for n in cm.graph.nodes if n.target == torch.ops.aten.linear.default]
    all_linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {n.meta[MODULE_KEY] for n in linears} == all_linear - DEAD.get(name, set())
    assert len(linears) == len(all_linear) - len(DEAD.get(name, set()))
    # every linear node knows the FQN of its nn.Linear
    modules = dict(model.named_modules())
    for n in linears:
        assert isinstance(modules[n.meta[MODULE_KEY]], torch.nn.Linear), n.meta[MODULE_KEY]
    with torch.no_grad():
        ref = model(**example)
        got = cm.exported.module()(**example)
    for a, b in zip(pytree.tree_leaves(ref), pytree.tree_leaves(got), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux", "tiny-sdxl"])
def test_batch_stays_dynamic(zoo, name):
    """A graph captured at batch 2 runs at batch 3 and 1 with the eager result."""
    from segquant_fx.models import build_model

    model, _, cm, _ = zoo(name)
    gm = cm.exported.module()
    for b in (1, 3):
        _, ex = build_model(name, batch_size=b)
        with torch.no_grad():
            ref = _first(model(**ex))
            got = _first(gm(**ex))
        assert got.shape[0] == b
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_batch_one_example_is_doubled_so_batch_stays_dynamic():
    from segquant_fx.models import build_model

    model, ex = build_model("tiny-sd3", batch_size=1)
    cm = capture(model, ex)
    assert cm.batch_doubled
    assert 0 in cm.dynamic_dims["hidden_states"]
    _, ex4 = build_model("tiny-sd3", batch_size=4)
    with torch.no_grad():
        out = _first(cm.exported.module()(**ex4))
    assert out.shape[0] == 4


def test_token_and_spatial_dims_dynamic_feature_dims_static(zoo):
    _, _, cm, _ = zoo("tiny-flux")
    assert cm.dynamic_dims["hidden_states"] == (0, 1)  # batch, image tokens; features static
    assert cm.dynamic_dims["encoder_hidden_states"] == (0, 1)
    _, _, cm, _ = zoo("tiny-sd3")
    assert cm.dynamic_dims["hidden_states"] == (0, 2, 3)  # NCHW: channels static


def test_ir_is_undecomposed(zoo):
    """Pin the IR: linear and chunk stay as written (a torch upgrade that changes this must fail here)."""
    _, _, cm, _ = zoo("tiny-sd3")
    targets = {n.target for n in cm.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.linear.default in targets
    assert torch.ops.aten.chunk.default in targets
    assert torch.ops.aten.addmm.default not in targets
    assert torch.ops.aten.gelu.default in targets


def test_plain_module_positional_and_args_kwargs_forms():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 6)
            self.b = torch.nn.Linear(6, 2)

        def forward(self, x, scale=1.0, bias=None):
            y = self.b(torch.relu(self.a(x))) * scale
            return y if bias is None else y + bias

    m = M()
    x = torch.randn(3, 4)
    for ex in [(x,), {"x": x}, ((x,), {"scale": 2.0}), x]:
        cm = capture(m, ex)
        assert {node_module(n) for n in cm.graph.nodes if n.target == torch.ops.aten.linear.default} == {
            "a",
            "b",
        }
    assert m.training  # mode restored
    cm = capture(m, ((x,), {"bias": torch.randn(3, 2)}))
    assert "bias" in cm.dynamic_dims or cm.graph is not None


def test_normalize_example_forms():
    x = torch.randn(2)
    assert normalize_example({"x": x})[1]["x"] is x
    assert normalize_example((x, 3))[0][1] == 3
    assert normalize_example(((x,), {"k": 1})) == ((x,), {"k": 1})
    with pytest.raises(CaptureError, match="pass a kwargs dict"):
        normalize_example(42)


def test_example_that_does_not_fit_forward_names_the_argument():
    with pytest.raises(CaptureError, match=r"forward\(input\): unexpected argument\(s\) 'hidden'"):
        capture(torch.nn.Linear(2, 2), {"hidden": torch.randn(1, 2)})


def test_not_a_module():
    with pytest.raises(CaptureError, match="needs an nn.Module, got function"):
        capture(lambda x: x, (torch.randn(2),))


def test_uncapturable_model_names_source_line_and_remedy():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # branches on a tensor value
                return x * 2
            return x

    with pytest.raises(CaptureError) as info:
        capture(DataDependent(), (torch.randn(3, 4),))
    msg = str(info.value)
    assert "DataDependent" in msg
    assert "test_capture.py" in msg and "x.sum() > 0" in msg
    assert "what you can do:" in msg


# ---- shape branches: upper bounds on dynamic sizes -------------------------------------------------


class _LayoutBranch(torch.nn.Module):
    """diffusers' Upsample2D pattern: a layout-only branch on the batch size."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        if x.shape[0] >= 4:
            x = x.contiguous()
        return self.lin(x)[:, :]


class _ValueBranch(torch.nn.Module):
    """A branch that changes the result past the bound: the bound must stay."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        if x.shape[0] >= 4:
            x = x * 2
        return self.lin(x)


def _bounded(cm):
    from torch.utils._sympy.numbers import int_oo

    return {str(s): int(vr.upper) for s, vr in cm.exported.range_constraints.items() if vr.upper != int_oo}


def test_layout_only_shape_branch_does_not_bound_the_batch(recwarn):
    m = _LayoutBranch().eval()
    cm = capture(m, (torch.randn(2, 8),))
    assert _bounded(cm) == {}
    assert not [w for w in recwarn if "accepts" in str(w.message)]
    gm = cm.exported.module()
    for b in (2, 3, 4, 9):
        x = torch.randn(b, 8)
        torch.testing.assert_close(gm(x=x), m(x))


def test_value_changing_shape_branch_keeps_the_bound_and_says_so():
    m = _ValueBranch().eval()
    with pytest.warns(UserWarning, match=r"accepts x\.shape\[0\] <= 3 only .*runs other ops"):
        cm = capture(m, (torch.randn(2, 8),))
    assert list(_bounded(cm).values()) == [3]
    gm = cm.exported.module()
    x = torch.randn(3, 8)
    torch.testing.assert_close(gm(x=x), m(x))
    with pytest.raises(AssertionError, match="Guard failed"):
        gm(x=torch.randn(4, 8))


def test_builtin_unet_runs_past_its_upsample_batch_branch():
    """The trained UNet's Upsample2D branches at batch 64: the quantized graph must still take batch 64+."""
    from segquant_fx.t2i.models import builtin_weights_dir, load_builtin

    if not (builtin_weights_dir("unet") / "backbone.safetensors").is_file():
        pytest.skip("no built-in UNet weights")
    b = load_builtin("unet")
    g = torch.Generator().manual_seed(0)
    ex = {
        "sample": torch.randn(2, 3, 32, 32, generator=g),
        "timestep": torch.tensor([10.0, 500.0]),
        "encoder_hidden_states": torch.randn(2, 24, 128, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, 128, generator=g),
            "time_ids": torch.ones(2, 6) * 32,
        },
    }
    cm = capture(b.backbone, ex)
    assert _bounded(cm) == {}
    big = pytree.tree_map(
        lambda t: t.repeat(33, *([1] * (t.dim() - 1))) if isinstance(t, torch.Tensor) else t, ex
    )
    with torch.no_grad():
        got = cm.exported.module()(**big)[0]
        want = b.backbone(**big)[0]
    assert got.shape[0] == 66
    torch.testing.assert_close(got, want)
