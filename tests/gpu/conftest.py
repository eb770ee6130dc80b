"""Fixtures of the GPU tests: the loaded kernel library, GEMM availability, fallback bookkeeping.

Every test here needs a CUDA device (tests/conftest.py skips them without one). With a device, a
missing or broken ``libsegquant_kernels.so`` is a test failure (not a skip): build it with
``segquant-fx build-kernels`` and carry ``kernels_cuda/build`` to the GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from segquant_fx.ops import cuda_kernels as ck
from segquant_fx.ops import library
from segquant_fx.ops.kernel_preference import KernelPreference, use_kernel_preference


@pytest.fixture(scope="session")
def kernels():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not ck.is_available():
        pytest.fail(f"the segquant kernel library is not usable: {ck.unavailable_reason()}")
    for op in ("quantize", "quantize_dynamic", "quantize_dual"):
        assert library.has_cuda_impl(op), f"{op} has no registered CUDA implementation"
    print(f"\nkernel library: {ck.library_path()} (sq_gemm: {ck.has_gemm()})")
    return ck


@pytest.fixture(scope="session")
def gemm(kernels):
    if not kernels.has_gemm():
        pytest.fail(f"{kernels.library_path()} has no sq_gemm: was kernels_cuda/src/gemm_sm90*.cu built?")
    cap = torch.cuda.get_device_capability()
    if cap != (9, 0) and not (cap >= (8, 0) and kernels.has_sm80_gemm()):
        pytest.skip(
            f"sq_gemm runs on sm_90 (and sm_80+ with the CUTLASS 2 path); this device is sm_{cap[0]}{cap[1]}"
        )
    assert library.has_cuda_impl("qlinear")
    return kernels


@pytest.fixture
def sm80_path(gemm):
    """Run the test on the CUTLASS 2 GEMMs (on Hopper too), restoring the automatic choice after."""
    if not gemm.has_sm80_gemm():
        pytest.fail(f"{gemm.library_path()} has no sq_set_gemm_path: rebuild the kernels (API version 2)")
    with gemm.gemm_path("sm80"):
        yield gemm


@pytest.fixture
def no_fallback(monkeypatch, kernels):
    """Make any fallback to the reference inside the CUDA implementations an error."""

    def boom(op, reason, key=None):
        raise AssertionError(f"segquant::{op} fell back to the reference: {reason}")

    monkeypatch.setattr(kernels, "_warn_fallback", boom)


@pytest.fixture
def fresh_warnings(kernels):
    kernels.reset_fallback_warnings()
    yield
    kernels.reset_fallback_warnings()


@pytest.fixture
def cuda_pref():
    with use_kernel_preference(KernelPreference.CUDA):
        yield
