"""``segquant_fx.compile`` and the ``"segquant"`` torch.compile backend, with Inductor on CPU.

Inductor compiles dominate the run time of this file (Python lowering and C++ builds), so every tiny
backbone is compiled once (module-scoped fixture) with scalar C++ kernels (``cpp.vec_isa_ok=False``
compiles about three times faster than vectorized kernels and computes the same float32 arithmetic),
quantized models come from the session cache in ``tests/_utils/deploy.py`` (shared with
``test_onnx.py``), and the backend tests use small toy models; Dynamo-only properties are checked
with ``backend="eager"``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch._dynamo
from _utils.deploy import BACKBONES, Toy, first, quantized_zoo, rel, resolutions, toy_calib, toy_quantized
from torch import nn
from torch._dynamo.utils import counters
from torch.utils import _pytree as pytree

import segquant_fx
from segquant_fx.backend import make_backend, quant_decompositions
from segquant_fx.compile import CompiledQuantizedModel
from segquant_fx.errors import ConfigError
from segquant_fx.ops.reference import sample_inputs

FAST = {"cpp.vec_isa_ok": False}
ROOT = Path(__file__).resolve().parents[2]
#: Each backbone is compiled once, through one of the two entry points: SD3 (whose 16-wide pooled
#: projection duck-sizes with the 16-pixel latent) through ``torch.compile(qmodel, backend="segquant")``,
#: FLUX and SDXL through ``segquant_fx.compile``. The SDXL UNet is the slowest case, still run in CI.
PATHS = {"tiny-sd3": "torch.compile", "tiny-flux": "segquant_fx.compile", "tiny-sdxl": "segquant_fx.compile"}
PARAMS = [
    pytest.param((n, PATHS[n]), id=f"{n}-{PATHS[n]}", marks=[pytest.mark.slow] if n == "tiny-sdxl" else [])
    for n in BACKBONES
]


def dynamo_stats() -> dict[str, int]:
    """Graphs Dynamo compiled and graph breaks it hit since ``counters.clear()``."""
    return {
        "unique_graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
    }


@pytest.fixture(scope="module", params=PARAMS)
def compiled(request):
    """Compile one quantized backbone (fullgraph, dynamic) and run it at three resolutions."""
    from torch._inductor.utils import run_and_get_code

    name, path = request.param
    model, qmodel = quantized_zoo(name)
    if path == "torch.compile":
        fast = torch.compile(qmodel, backend="segquant", dynamic=True, fullgraph=True, options=FAST)
    else:
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
        stats = dynamo_stats()
        eager = [qmodel(**kw, return_dict=False) for kw in inputs]
        floats = [model(**kw, return_dict=False) for kw in inputs]
    return {
        "name": name, "path": path, "fast": fast, "qmodel": qmodel, "inputs": inputs, "outs": outs,
        "eager": eager, "floats": floats, "stats": stats, "code": "\n".join(codes),
    }  # fmt: skip


def test_compile_fullgraph_no_graph_breaks(compiled):
    """fullgraph=True compiles the whole quantized backbone as one graph."""
    assert isinstance(compiled["fast"], CompiledQuantizedModel) == (compiled["path"] == "segquant_fx.compile")
    assert compiled["stats"]["graph_breaks"] == 0


def test_compile_three_resolutions_no_recompile(compiled):
    """With dynamic=True, three resolutions (token counts) reuse the first compiled graph.

    Without the marks of ``mark_export_dims`` Dynamo's duck sizing gives equal sizes one symbol (tiny
    SD3's 16-wide pooled projection and its 16-pixel latent); the linear pins it, and the second
    resolution recompiles. The marks go on aliases: the callers' tensors stay unmarked.
    """
    assert compiled["stats"]["unique_graphs"] == 1
    shapes = {tuple(first(o).shape) for o in compiled["outs"]}
    assert len(shapes) == 3
    for value in pytree.tree_leaves(compiled["inputs"]):
        assert not any(a.startswith("_dynamo") for a in dir(value)), "a caller's tensor was marked"


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

    _, qmodel = toy_quantized()
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
# torch.compile(qmodel): dynamic shapes without recompiles
# --------------------------------------------------------------------------------------------------


def run_counted(fn, inputs: list[dict], reference) -> dict[str, int]:
    """Call ``fn`` on every input under fresh Dynamo counters; each output must equal ``reference``'s."""
    counters.clear()
    with torch.no_grad():
        for kw in inputs:
            out, ref = fn(kw), reference(kw)
            assert rel(first(out), first(ref)) <= 1e-5
    return dynamo_stats()


@pytest.mark.parametrize(
    ("dynamic", "graphs"),
    [(True, 1), (None, 2), (False, 3)],
    ids=["dynamic", "automatic", "static"],
)
def test_torch_compile_quantized_model_follows_dynamic(dynamic, graphs):
    """Three token counts (16 first: the feature width) under each ``dynamic`` setting of torch.compile.

    True: one graph (marks beat duck sizing); None: Dynamo's automatic policy (static first, dynamic
    after the first change); False: one graph per shape. The quantized graph module's frame is the one
    compiled (Dynamo skips forward's frame), so ``fullgraph=True`` holds. A model of its own per case:
    Dynamo remembers the sizes a frame has seen (automatic dynamic) across torch.compile calls.
    """
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = segquant_fx.quantize(Toy().eval(), toy_calib(), "w8a8", progress=False)
    fast = torch.compile(qmodel, backend="eager", dynamic=dynamic, fullgraph=True)
    inputs = [{"x": torch.randn(2, t, 16)} for t in (16, 8, 24)]
    stats = run_counted(lambda kw: fast(**kw), inputs, lambda kw: qmodel(**kw))
    assert stats == {"unique_graphs": graphs, "graph_breaks": 0}


def test_quantized_model_inlined_in_compiled_function():
    """Called inside a compiled function, the quantized model is traced into its graph (no break)."""
    from segquant_fx.backend import is_quantized_graph

    _, qmodel = toy_quantized()
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    fast = torch.compile(lambda x: 2 * qmodel(x=x), backend=keep, fullgraph=True)
    inputs = [{"x": torch.randn(2, 6, 16)}]
    stats = run_counted(lambda kw: fast(**kw), inputs, lambda kw: 2 * qmodel(**kw))
    assert stats == {"unique_graphs": 1, "graph_breaks": 0}
    assert len(graphs) == 1 and is_quantized_graph(graphs[0])


# --------------------------------------------------------------------------------------------------
# the "segquant" backend
# --------------------------------------------------------------------------------------------------


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


def test_backend_on_quantized_model():
    """torch.compile(qmodel, backend="segquant") compiles the quantized graph with Inductor."""
    _, qmodel = toy_quantized()
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


ENTRY_POINT = "segquant = segquant_fx.backend:segquant_backend"

# run in a fresh interpreter: nothing of segquant_fx is imported before torch.compile looks the name up
FRESH = textwrap.dedent(
    """
    import sys, warnings
    import torch
    from torch import nn
    import torch.nn.functional as F

    class Toy(nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.norm, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            return x + self.fc2(F.gelu(self.fc1(self.norm(x))))

    torch.manual_seed(0)
    model = Toy().eval()
    g = torch.Generator().manual_seed(0)
    calib = [{"x": torch.randn(2, 6, 16, generator=g)} for _ in range(3)]
    assert "segquant_fx" not in sys.modules
    fast = torch.compile(model, backend="segquant", options={"calib": calib, "config": "w8a8", "cpp.vec_isa_ok": False})
    assert "segquant_fx.backend" in sys.modules  # torch.compile looked the name up: the entry point
    x = torch.randn(2, 6, 16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = fast(x)
        import segquant_fx

        ref = segquant_fx.quantize(model, calib, "w8a8", progress=False)(x)
        err = float((y - ref).norm() / ref.norm())
        assert err < 1e-5, err
        assert float((y - model(x)).norm() / model(x).norm()) > 1e-4  # really quantized
    print("ok")
    """
)


def declared_entry_point() -> str:
    """The ``torch_dynamo_backends`` line of pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.entry-points.torch_dynamo_backends]", 1)
    assert len(section) == 2, "pyproject.toml declares no torch_dynamo_backends entry point"
    line = next(ln for ln in section[1].splitlines() if ln.strip() and not ln.startswith("#"))
    return line.replace('"', "").strip()


def test_registered_backend_in_fresh_interpreter(tmp_path):
    """torch.compile(model, backend="segquant", options=...) works where segquant_fx was never imported.

    torch finds the name through the package's ``torch_dynamo_backends`` entry point. Where the
    installed metadata predates the entry point (an old editable install), a throwaway dist-info with
    the line pyproject.toml declares stands in for it, so the declaration itself is what is tested.
    """
    from importlib.metadata import entry_points

    assert declared_entry_point() == ENTRY_POINT
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "TORCHINDUCTOR_COMPILE_THREADS": "1",  # a handful of kernels (cached by now): no worker pool
    }
    if "segquant" not in entry_points(group="torch_dynamo_backends").names:
        info = tmp_path / "segquant_fx_entry_point-0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: segquant-fx-entry-point\nVersion: 0\n")
        (info / "entry_points.txt").write_text(f"[torch_dynamo_backends]\n{ENTRY_POINT}\n")
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    proc = subprocess.run(
        [sys.executable, "-c", FRESH], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_backend_module_import_leaves_entry_point_registration_to_torch(monkeypatch):
    """While torch loads the module for the entry point, importing it must not register the name too.

    torch's ``lookup_backend`` registers ``entry_point.load()`` under the name and refuses duplicates.
    """
    from torch._dynamo.backends import registry

    import segquant_fx.backend as backend

    monkeypatch.setattr(
        registry, "_COMPILER_FNS", {k: v for k, v in registry._COMPILER_FNS.items() if k != "segquant"}
    )
    monkeypatch.setattr(registry, "_BACKENDS", {**registry._BACKENDS, "segquant": object()})
    backend._register_backend()
    assert "segquant" not in registry._COMPILER_FNS
    monkeypatch.setattr(
        registry, "_BACKENDS", {k: v for k, v in registry._BACKENDS.items() if k != "segquant"}
    )
    backend._register_backend()
    assert registry._COMPILER_FNS["segquant"] is backend.segquant_backend


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
