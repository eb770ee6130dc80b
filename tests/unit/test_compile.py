"""``segquant_fx.compile`` and the ``"segquant"`` torch.compile backend, with Inductor on CPU.

Inductor's C++ code generation dominates the run time of this file, so every tiny backbone is
compiled once (module-scoped fixture) with scalar C++ kernels (``cpp.vec_isa_ok=False`` compiles about
three times faster than vectorized kernels and computes the same float32 arithmetic), and the backend
tests use small toy models.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters
from torch.utils import _pytree as pytree

import segquant_fx
from segquant_fx.backend import make_backend, quant_decompositions
from segquant_fx.compile import CompiledQuantizedModel
from segquant_fx.errors import ConfigError
from segquant_fx.models import build_model, calibration_items
from segquant_fx.ops.reference import sample_inputs

FAST = {"cpp.vec_isa_ok": False}
# the SDXL UNet compiles about 100 kernels (~100 s cold on 2 CPU cores): slow, still run in CI
BACKBONES = ["tiny-sd3", "tiny-flux", pytest.param("tiny-sdxl", marks=pytest.mark.slow)]


def quantized_zoo(config: pytest.Config, name: str):
    """(float model, quantized model) of a zoo backbone, shared by the test modules of a session."""
    cache = config.__dict__.setdefault("_segquant_quantized_zoo", {})
    if name not in cache:
        model, _ = build_model(name, batch_size=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cache[name] = (
                model,
                segquant_fx.quantize(model, calibration_items(name, 2), "w8a8", progress=False),
            )
    return cache[name]


def _flux_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(w, dtype=torch.float32)[None, :]
    return ids.reshape(h * w, 3)


def resolutions(name: str) -> list[dict]:
    """Three inputs of different resolution (token count) for one backbone, batch 2."""
    _, base = build_model(name, batch_size=2, seed=11)
    g = torch.Generator().manual_seed(5)
    out = [base]
    if name == "tiny-flux":
        for h, w in ((4, 6), (6, 6)):
            out.append(
                {**base, "hidden_states": torch.randn(2, h * w, 16, generator=g), "img_ids": _flux_ids(h, w)}
            )
    else:
        key = "sample" if name == "tiny-sdxl" else "hidden_states"
        sizes = (24, 32) if name == "tiny-sdxl" else (12, 24)
        for s in sizes:
            out.append({**base, key: torch.randn(2, 4, s, s, generator=g)})
    return out


def first(out) -> torch.Tensor:
    return pytree.tree_leaves(out)[0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.fixture(scope="module", params=BACKBONES)
def compiled(request):
    """Compile one quantized backbone (fullgraph, dynamic) and run it at three resolutions."""
    from torch._inductor.utils import run_and_get_code

    name = request.param
    model, qmodel = quantized_zoo(request.config, name)
    fast = segquant_fx.compile(qmodel, None, dynamic=True, fullgraph=True, options=FAST)
    counters.clear()
    inputs = resolutions(name)
    outs, codes = [], []
    with torch.no_grad():
        for i, kwargs in enumerate(inputs):
            if i == 0:
                out, codes = run_and_get_code(fast, **kwargs, return_dict=False)
            else:
                out = fast(**kwargs, return_dict=False)
            outs.append(out)
        stats = {
            "unique_graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
        }
        eager = [qmodel(**kw, return_dict=False) for kw in inputs]
        floats = [model(**kw, return_dict=False) for kw in inputs]
    return {
        "name": name, "fast": fast, "qmodel": qmodel, "inputs": inputs, "outs": outs, "eager": eager,
        "floats": floats, "stats": stats, "code": "\n".join(codes),
    }  # fmt: skip


def test_compile_fullgraph_no_graph_breaks(compiled):
    """fullgraph=True compiles the whole quantized backbone as one graph."""
    assert isinstance(compiled["fast"], CompiledQuantizedModel)
    assert compiled["stats"]["graph_breaks"] == 0


def test_compile_three_resolutions_no_recompile(compiled):
    """With dynamic=True, three resolutions (token counts) reuse the first compiled graph."""
    assert compiled["stats"]["unique_graphs"] == 1
    shapes = {tuple(first(o).shape) for o in compiled["outs"]}
    assert len(shapes) == 3


def test_compile_matches_eager_quantized(compiled):
    """Compiled output equals the eager quantized output within float rounding.

    Inductor computes some float ops (GroupNorm and convolutions in the SDXL UNet) in another order
    (float model: 1e-6 relative). A last-bit difference right at a rounding boundary moves a static
    int8 code by one step (1 element in ~8000 at the first UNet attention), and 100 quantized layers
    of a random-weight UNet compound those steps, so for SDXL the bound is a fraction of the
    quantization error itself; SD3 and FLUX match to 1e-5.
    """
    for out, ref, flt in zip(compiled["outs"], compiled["eager"], compiled["floats"], strict=True):
        o, r = first(out), first(ref)
        assert o.shape == r.shape and o.dtype == r.dtype
        quant_err = rel(r, first(flt))
        bound = 1e-5 if compiled["name"] != "tiny-sdxl" else 0.5 * quant_err
        assert rel(o, r) <= bound, (compiled["name"], rel(o, r), quant_err)


def test_compile_fuses_quantize_keeps_qlinear_extern(compiled):
    """quantize/quantize_dual are decomposed and fused by Inductor; the GEMMs stay segquant::qlinear."""
    code = compiled["code"]
    assert "torch.ops.segquant.qlinear.default" in code
    assert "torch.ops.segquant.quantize.default" not in code
    assert "torch.ops.segquant.quantize_dual.default" not in code


def test_compiled_model_keeps_calling_convention(compiled):
    """The compiled model is called like the float model and forwards plan/report/attributes."""
    fast, qmodel = compiled["fast"], compiled["qmodel"]
    assert fast.plan is qmodel.plan and fast.model_class == qmodel.model_class
    assert "quantized linear layers" in fast.report()
    with torch.no_grad():
        out = fast(**compiled["inputs"][0])
    assert hasattr(out, "sample") and torch.equal(out.sample, first(compiled["outs"][0]))


# --------------------------------------------------------------------------------------------------
# decompositions
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "op",
    ["quantize", "dequantize", "quantize_dual", "quantize_dynamic", "fake_quantize", "fake_quantize_dual"],
)
def test_decompositions_match_ops_bit_exactly(op):
    """The Inductor decompositions compute exactly what the op contract (reference kernels) computes."""
    overload = getattr(torch.ops.segquant, op).default
    decomp = quant_decompositions()[overload]
    for args in sample_inputs(op):
        want, got = overload(*args), decomp(*args)
        for w, g in zip(pytree.tree_leaves(want), pytree.tree_leaves(got), strict=True):
            assert w.dtype == g.dtype and w.shape == g.shape
            assert torch.equal(
                w.view(torch.uint8) if w.element_size() == 1 else w,
                g.view(torch.uint8) if g.element_size() == 1 else g,
            )


def test_fuse_false_keeps_extern_ops_and_never_reuses_fused_cache():
    """fuse=False keeps quantize as an extern call, even right after the same graph compiled fused.

    Inductor's graph caches key on the graph before decomposition; the backend tags the key with its
    decomposition table, so the two variants never share a cached artifact.
    """
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = segquant_fx.quantize(Toy().eval(), toy_calib(), "w8a8", progress=False)
    x = torch.randn(2, 6, 16)
    codes = {}
    with torch.no_grad():
        for fuse in (True, False):
            fast = segquant_fx.compile(qmodel, None, fuse=fuse, options=FAST)
            out, code = run_and_get_code(fast, x)
            codes[fuse] = "\n".join(code)
            assert rel(out, qmodel(x)) < 1e-5
    assert "torch.ops.segquant.quantize.default" not in codes[True]
    assert "torch.ops.segquant.quantize.default" in codes[False]
    assert (
        "torch.ops.segquant.qlinear.default" in codes[True]
        and "torch.ops.segquant.qlinear.default" in codes[False]
    )


def test_qlinear_is_not_decomposed():
    """The GEMM is never decomposed: it stays our kernel."""
    assert torch.ops.segquant.qlinear.default not in quant_decompositions()


# --------------------------------------------------------------------------------------------------
# the "segquant" backend
# --------------------------------------------------------------------------------------------------


class Toy(nn.Module):
    """A DiT-style MLP: LayerNorm -> Linear -> GELU -> Linear, plus a residual."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Breaky(nn.Module):
    """Two MLPs with a graph break (a print) between them."""

    def __init__(self):
        super().__init__()
        self.first = Toy()
        self.second = Toy()

    def forward(self, x):
        h = self.first(x)
        print("segquant test: graph break")
        return self.second(h)


def toy_calib(n: int = 3, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(2, 6, 16, generator=g)} for _ in range(n)]


def test_backend_on_quantized_model():
    """torch.compile(qmodel, backend="segquant") compiles the quantized graph with Inductor."""
    torch.manual_seed(0)
    model = Toy().eval()
    qmodel = segquant_fx.quantize(model, toy_calib(), "w8a8", progress=False)
    fast = torch.compile(qmodel, backend="segquant", fullgraph=True, options=FAST)
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        assert rel(fast(x), qmodel(x)) < 1e-5


def test_backend_float_model_graph_break_quantizes_each_subgraph(capsys):
    """A float model with a graph break: each Dynamo graph is re-captured and quantized separately.

    The first graph (inputs = forward's arguments) is calibrated on the calib items; the graph after
    the break is calibrated on the activations of the call that reached it first.
    """
    torch.manual_seed(0)
    model = Breaky().eval()
    calib = toy_calib()
    backend = make_backend(calib, "w8a8", inductor_options=FAST)
    fast = torch.compile(model, backend=backend, dynamic=True)
    x1, x2 = torch.randn(2, 6, 16), torch.randn(3, 5, 16)  # dynamic: a new shape does not recompile
    counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            y1, y2 = fast(x1), fast(x2)
    assert sum(counters["graph_break"].values()) >= 1
    graphs = backend.graphs
    assert len(graphs) == 2
    plans = [set(g.qmodel.plan) for g in graphs]
    assert plans == [{"first.fc1", "first.fc2"}, {"second.fc1", "second.fc2"}]

    # reference: quantize the two halves separately, the second on what the first call gave it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q1 = segquant_fx.quantize(model.first, calib, "w8a8", progress=False)
        with torch.no_grad():
            h1 = q1(x1)
        q2 = segquant_fx.quantize(model.second, [(h1,)], "w8a8", progress=False)
    with torch.no_grad():
        for x, y in ((x1, y1), (x2, y2)):
            ref = q2(q1(x))
            assert rel(y, ref) < 1e-5
            assert rel(y, model(x)) > 1e-4  # really quantized
    assert "graph break" in capsys.readouterr().out


def test_backend_calibrates_on_first_calls():
    """options={"calib": N}: a graph runs in float for its first N - 1 calls, recording, then quantized."""
    torch.manual_seed(0)
    model = Toy().eval()
    backend = make_backend(2, "w8a8", inductor_options=FAST)
    fast = torch.compile(model, backend=backend)
    xs = [c["x"] for c in toy_calib(3, seed=3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            ys = [fast(x) for x in xs]
            assert torch.equal(ys[0], model(xs[0]))  # first call: float, recorded
            ref = segquant_fx.quantize(model, [(x,) for x in xs[:2]], "w8a8", progress=False)
            assert rel(ys[1], ref(xs[1])) < 1e-5 and rel(ys[2], ref(xs[2])) < 1e-5


def test_registered_backend_with_options():
    """The registered backend takes calib/config through options and Inductor patches beside them."""
    torch.manual_seed(0)
    model = Toy().eval()
    calib = toy_calib()
    fast = torch.compile(model, backend="segquant", options={"calib": calib, "config": "w8a8", **FAST})
    x = torch.randn(2, 6, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = segquant_fx.quantize(model, calib, "w8a8", progress=False)
        with torch.no_grad():
            assert rel(fast(x), ref(x)) < 1e-5


def test_compile_float_model_end_to_end():
    """segquant_fx.compile(model, calib) quantizes through export and compiles."""
    torch.manual_seed(0)
    model = Toy().eval()
    calib = toy_calib()
    fast = segquant_fx.compile(model, calib, "w8a8", progress=False, options=FAST)
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        assert rel(fast(x=x), fast.quantized(x)) < 1e-5
    assert set(fast.plan) == {"fc1", "fc2"}


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------


def test_backend_float_graph_without_calib_raises():
    """A float graph with linears and no calibration data: a ConfigError that says what to pass."""
    fast = torch.compile(Toy().eval(), backend="segquant")
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="no calibration data") as info:
        fast(torch.randn(2, 6, 16))
    assert isinstance(info.value.inner_exception, ConfigError)


def test_backend_unknown_option_raises():
    """An option that is neither ours nor an Inductor config name is rejected, naming the valid keys."""
    with pytest.raises(ConfigError, match="unknown option 'bogus'.*calib"):
        make_backend(toy_calib(), inductor_options={"bogus": 1})


def test_backend_bad_calib_raises():
    """calib must be items or a positive number of calls."""
    with pytest.raises(ConfigError, match="positive number"):
        make_backend(0)
    with pytest.raises(ConfigError, match="calib_calls"):
        make_backend(toy_calib(), calib_calls=0)


def test_compile_rejects_backend_and_missing_calib():
    """segquant_fx.compile always uses the segquant Inductor backend and needs calib for float models."""
    with pytest.raises(ConfigError, match="always compiles with the segquant Inductor backend"):
        segquant_fx.compile(Toy(), toy_calib(), backend="eager")
    with pytest.raises(ConfigError, match="calib=None"):
        segquant_fx.compile(Toy(), None)


def test_compile_module_is_callable_after_direct_import():
    """``import segquant_fx.compile`` must not shadow the function ``segquant_fx.compile``."""
    import importlib

    mod = importlib.import_module("segquant_fx.compile")
    assert callable(segquant_fx.compile) and callable(mod)
