"""Calls a diffusers pipeline makes that differ from the capture example: a 0-d (or Python number)
timestep, ``joint_attention_kwargs={}`` for ``None``. The quantized model must take them as the float
model does."""

from __future__ import annotations

import pytest
import torch
from _utils.deploy import quantized_zoo

from segquant_fx.errors import SegQuantError
from segquant_fx.models.zoo import build_model
from segquant_fx.quantized import _batch_vector_inputs, _placeholder_values


def _out(y):
    return y[0] if isinstance(y, (tuple, list)) else getattr(y, "sample", y)


@pytest.fixture(scope="module")
def sdxl():
    model, q = quantized_zoo("tiny-sdxl")
    _, inputs = build_model("tiny-sdxl", batch_size=2, seed=3)
    return model, q, inputs


def test_unet_takes_a_0d_timestep_as_the_pipeline_passes_it(sdxl):
    model, q, inputs = sdxl
    t = inputs["timestep"][0]
    with torch.no_grad():
        got = _out(q(**{**inputs, "timestep": t}))
        same = _out(q(**{**inputs, "timestep": t.expand(2).clone()}))
        ref = _out(model(**{**inputs, "timestep": t}))
    torch.testing.assert_close(got, same, rtol=0, atol=0)
    assert float((got - ref).norm() / ref.norm()) < 0.05  # quantization error only


def test_unet_takes_a_python_number_timestep(sdxl):
    _, q, inputs = sdxl
    t = float(inputs["timestep"][0])
    with torch.no_grad():
        got = _out(q(**{**inputs, "timestep": t}))
        want = _out(q(**{**inputs, "timestep": torch.full((2,), t)}))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_only_per_sample_vectors_are_broadcast():
    _, q = quantized_zoo("tiny-flux")
    # FLUX: timestep and guidance are per sample; img_ids / txt_ids lead with tokens, not the batch
    assert set(_batch_vector_inputs(_placeholder_values(q.graph_module), q._input_names)) == {
        "timestep",
        "guidance",
    }
    _, q3 = quantized_zoo("tiny-sd3")
    assert set(_batch_vector_inputs(_placeholder_values(q3.graph_module), q3._input_names)) == {"timestep"}


def test_empty_joint_attention_kwargs_is_none():
    model, q = quantized_zoo("tiny-sd3")
    _, inputs = build_model("tiny-sd3", batch_size=2, seed=4)
    with torch.no_grad():
        a = _out(q(**inputs, joint_attention_kwargs={}))
        b = _out(q(**inputs, joint_attention_kwargs=None))
        c = _out(q(**inputs))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    with pytest.raises(SegQuantError, match=r"'joint_attention_kwargs'=\{'scale': 0.5\} differs"):
        q(**inputs, joint_attention_kwargs={"scale": 0.5})


@pytest.fixture(scope="module")
def sdxl_scalar_t():
    """tiny-sdxl calibrated as inside an SDXL pipeline: a 0-d timestep."""
    import warnings

    import segquant_fx

    model, inputs = build_model("tiny-sdxl", batch_size=2)
    item = {**inputs, "timestep": inputs["timestep"][0]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = segquant_fx.quantize(model, [item], "w8a8", progress=False)
    return q, inputs


def test_scalar_captured_timestep_takes_an_expanded_one(sdxl_scalar_t):
    q, inputs = sdxl_scalar_t
    t = inputs["timestep"][0]
    with torch.no_grad():
        want = _out(q(**{**inputs, "timestep": t}))
        got = _out(q(**{**inputs, "timestep": t.expand(2)}))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_scalar_captured_timestep_rejects_per_sample_values(sdxl_scalar_t):
    q, inputs = sdxl_scalar_t
    with pytest.raises(
        SegQuantError, match=r"'timestep' has shape \(2,\), but the model was captured with a 0-d"
    ):
        q(**{**inputs, "timestep": torch.tensor([10.0, 500.0])})
