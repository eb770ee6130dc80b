"""The C++ example (kernels_cuda/examples/gemm_example.cpp) runs on the GPU and prints PASS.

Uses the prebuilt ``kernels_cuda/build/gemm_example`` (``segquant-fx build-kernels --example``)
when it is there and newer than its source, else builds it with nvcc against the built library.
"""

from __future__ import annotations

import subprocess

import pytest
import torch

from segquant_fx.ops import build as B

pytestmark = pytest.mark.gpu


def _example_binary(kernels) -> str:
    build_dir = B.default_build_dir()
    binary = build_dir / B.EXAMPLE_NAME
    source = B.kernels_root() / "examples" / "gemm_example.cpp"
    if binary.is_file() and binary.stat().st_mtime >= source.stat().st_mtime:
        return str(binary)
    lib = build_dir / B.LIBRARY_NAME
    if not lib.is_file():
        pytest.fail(f"{lib} is missing: run `segquant-fx build-kernels --example` first")
    try:
        nvcc = B.find_nvcc()
    except B.KernelBuildError as e:
        pytest.fail(f"no prebuilt {binary} and cannot build it: {e}")
    out = build_dir / f".{B.EXAMPLE_NAME}.test"
    cmd = [
        nvcc,
        "-O2",
        "-std=c++17",
        f"-I{B.kernels_root() / 'include'}",
        str(source),
        "-o",
        str(out),
        f"-L{build_dir}",
        "-lsegquant_kernels",
        "-cudart",
        "static",
        "-Xlinker",
        "-rpath,$ORIGIN",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"building the example failed:\n{' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
    return str(out)


@pytest.mark.parametrize(
    "shape",
    [[], ["1", "3072", "3072"], ["333", "768", "1536"], ["77", "1024", "3072", "--path", "sm80"]],
    ids=str,
)
def test_c_example_passes(kernels, shape):
    if not kernels.has_gemm():
        pytest.fail("the library has no sq_gemm; the example needs it")
    cap = torch.cuda.get_device_capability()
    if "sm80" in shape and cap < (8, 0):
        pytest.skip("the CUTLASS 2 path needs sm_80+")
    if "sm80" not in shape and cap != (9, 0) and not kernels.has_sm80_gemm():
        pytest.skip("this library's sq_gemm runs on sm_90 only")
    binary = _example_binary(kernels)
    proc = subprocess.run([binary, *shape], capture_output=True, text=True, timeout=300, check=False)
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0, (
        f"{binary} {' '.join(shape)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    )
    assert proc.stdout.strip().splitlines()[-1] == "PASS"
