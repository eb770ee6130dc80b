"""KernelPreference and the CUDA-side kernel selection (exercised on CPU tensors)."""

from __future__ import annotations

import warnings

import pytest
import torch

from segquant_fx import ops
from segquant_fx.errors import ConfigError, KernelUnavailableError
from segquant_fx.ops import kernel_preference as kp
from segquant_fx.ops import library
from segquant_fx.ops.reference import OP_NAMES, reference_quantize, sample_inputs


@pytest.fixture(autouse=True)
def _isolated_selection_state(monkeypatch):
    """Each test starts from AUTO, no installed CUDA impls, no warning shown, hook not yet tried."""
    monkeypatch.setattr(kp, "_current", kp.KernelPreference.AUTO)
    monkeypatch.setattr(library, "_CUDA_IMPLS", {})
    monkeypatch.setattr(library, "_fallback_warned", False)
    monkeypatch.setattr(library, "_cuda_module_tried", False)
    monkeypatch.setattr(library, "_cuda_module_error", None)
    monkeypatch.setattr(library, "CUDA_KERNELS_MODULE", "segquant_fx.ops._test_no_such_kernels")


def _cuda_kernel(name):
    # The function registered for the CUDA dispatch key; callable with CPU tensors for testing.
    return library._make_cuda_kernel(name)


def _args():
    return sample_inputs("quantize", seed=21)[1]


def test_parse_and_context_manager():
    assert kp.KernelPreference.parse("Reference") is kp.KernelPreference.REFERENCE
    assert ops.get_kernel_preference() is kp.KernelPreference.AUTO
    with ops.use_kernel_preference("cuda") as p:
        assert p is kp.KernelPreference.CUDA
        assert ops.get_kernel_preference() is kp.KernelPreference.CUDA
    assert ops.get_kernel_preference() is kp.KernelPreference.AUTO
    assert ops.set_kernel_preference(kp.KernelPreference.REFERENCE) is kp.KernelPreference.AUTO
    assert ops.get_kernel_preference() is kp.KernelPreference.REFERENCE


def test_unknown_preference_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown kernel preference 'fast'; use one of 'auto', 'cuda'"):
        ops.set_kernel_preference("fast")


def test_environment_variable(monkeypatch):
    monkeypatch.setattr(kp, "_current", None)
    monkeypatch.setenv(kp.ENV_VAR, "reference")
    assert ops.get_kernel_preference() is kp.KernelPreference.REFERENCE
    monkeypatch.setattr(kp, "_current", None)
    monkeypatch.setenv(kp.ENV_VAR, "bogus")
    with pytest.raises(ConfigError, match=r"SEGQUANT_KERNEL_PREFERENCE='bogus' is invalid"):
        ops.get_kernel_preference()


def test_auto_without_cuda_impl_falls_back_with_one_warning():
    args = _args()
    with pytest.warns(
        RuntimeWarning,
        match=r"segquant::quantize: no compiled CUDA kernel \(segquant_fx.ops._test_no_such_kernels is not "
        r"installed\)",
    ):
        out = _cuda_kernel("quantize")(*args)
    assert torch.equal(out, reference_quantize(*args))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _cuda_kernel("quantize")(*args)
        _cuda_kernel("dequantize")(*sample_inputs("dequantize")[0])


def test_broken_kernel_module_degrades_to_reference(monkeypatch):
    def broken_import(name):
        raise OSError("libsegquant_kernels.so: cannot open shared object file")

    monkeypatch.setattr(library.importlib, "import_module", broken_import)
    with pytest.warns(RuntimeWarning, match=r"OSError: libsegquant_kernels.so: cannot open"):
        _cuda_kernel("quantize")(*_args())


def test_installed_cuda_impl_is_used_under_auto_and_cuda():
    calls = []

    def fake_kernel(*args):
        calls.append(args)
        return reference_quantize(*args)

    assert ops.register_cuda_impl("segquant::quantize", fake_kernel) is None
    assert ops.has_cuda_impl("quantize")
    args = _args()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _cuda_kernel("quantize")(*args)
        with ops.use_kernel_preference("cuda"):
            _cuda_kernel("quantize")(*args)
    assert len(calls) == 2
    assert calls[0][2:4] == ([2, 4, 6], "int4")
    with ops.use_kernel_preference("reference"):
        _cuda_kernel("quantize")(*args)
    assert len(calls) == 2
    assert ops.register_cuda_impl("quantize", None) is fake_kernel
    assert not ops.has_cuda_impl("quantize")


def test_cuda_preference_without_impl_raises():
    with (
        ops.use_kernel_preference("cuda"),
        pytest.raises(KernelUnavailableError, match=r"segquant::qlinear: Kernel"),
    ):
        _cuda_kernel("qlinear")(*sample_inputs("qlinear")[0])


def test_register_cuda_impl_rejects_non_callables():
    with pytest.raises(ConfigError, match=r"fn for 'qlinear' must be callable or None"):
        ops.register_cuda_impl("qlinear", 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", OP_NAMES)
def test_cuda_dispatch_matches_cpu_reference(name):
    for args in sample_inputs(name, seed=5):
        expected = getattr(torch.ops.segquant, name)(*args)
        cuda_args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
        with ops.use_kernel_preference("reference"):
            got = getattr(torch.ops.segquant, name)(*cuda_args)
        got_t = got if isinstance(got, tuple) else (got,)
        exp_t = expected if isinstance(expected, tuple) else (expected,)
        for g, e in zip(got_t, exp_t, strict=True):
            assert g.device.type == "cuda"
            torch.testing.assert_close(g.cpu().float(), e.float(), rtol=1e-5, atol=1e-5)
