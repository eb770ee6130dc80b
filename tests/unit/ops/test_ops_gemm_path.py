"""Which devices the qlinear GEMM routes accept (the CUTLASS 2 path for sm_80+, the sm_90a path for
Hopper) and the GEMM path switch's errors; CPU-only, the library state is faked with monkeypatch."""

from __future__ import annotations

import pytest

from segquant_fx.errors import ConfigError
from segquant_fx.ops import cuda_kernels as ck


@pytest.fixture
def fake_lib(monkeypatch):
    """A loaded library with (``sm80=True``) or without the CUTLASS 2 path."""

    def make(*, sm80: bool, path: str = "auto"):
        monkeypatch.setattr(ck, "_lib", object())
        monkeypatch.setattr(ck, "_lib_path", "libsegquant_kernels.so")
        monkeypatch.setattr(ck, "_has_gemm_path", sm80)
        monkeypatch.setattr(ck, "_current_path", path)

    return make


@pytest.mark.parametrize(
    ("cap", "xq", "sm80", "path", "fragment"),
    [
        ((9, 0), "int8", False, "auto", None),
        ((9, 0), "fp8_e4m3", True, "auto", None),
        ((9, 0), "int8", True, "sm80", None),  # Hopper running the CUTLASS 2 kernels
        ((8, 0), "int8", True, "auto", None),
        ((8, 6), "int8", True, "auto", None),
        ((8, 9), "fp8_e4m3", True, "auto", None),
        ((12, 0), "int8", True, "auto", None),  # the launch answers SQ_ERR_ARCH if not compiled in
        ((8, 0), "fp8_e4m3", True, "auto", "fp8 e4m3 GEMMs need sm_89 or newer; this device is sm_80"),
        ((8, 6), "fp8_e4m3", True, "auto", "this device is sm_86"),
        ((8, 0), "int8", False, "auto", "has only the sm_90a GEMMs (API version 1)"),
        ((7, 5), "int8", True, "auto", "need sm_80 or newer"),
        ((8, 9), "int8", True, "sm90", "forced to sm90"),
    ],
)
def test_arch_reason(fake_lib, cap, xq, sm80, path, fragment):
    fake_lib(sm80=sm80, path=path)
    reason = ck._arch_reason(cap, xq)
    if fragment is None:
        assert reason is None
    else:
        assert reason is not None and fragment in reason


def test_set_gemm_path_rejects_unknown_names(fake_lib):
    fake_lib(sm80=True)
    with pytest.raises(ConfigError, match=r"unknown GEMM path 'sm75'; use one of \['auto', 'sm80', 'sm90'\]"):
        ck.set_gemm_path("sm75")


def test_set_gemm_path_needs_api_version_2(fake_lib):
    fake_lib(sm80=False)
    with pytest.raises(ck.KernelLaunchError, match="API version 1"):
        ck.set_gemm_path("sm80")


def test_set_gemm_path_without_library(monkeypatch):
    monkeypatch.setattr(ck, "_lib", None)
    monkeypatch.setattr(ck, "_reason", "libsegquant_kernels.so could not be loaded (x: not found)")
    with pytest.raises(ck.KernelLaunchError, match="could not be loaded"):
        ck.set_gemm_path("auto")
