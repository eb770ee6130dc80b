"""CPU tests of the kernel build logic (segquant_fx.ops.build) and the ctypes binding (cuda_kernels).

The build tests run a fake nvcc (a Python script that logs its arguments and writes its outputs),
so they need no CUDA toolkit. The binding tests check loading, struct layouts and, when the real
library has been built (``segquant-fx build-kernels``), the C argument checks, which run before
any CUDA call and so work without a GPU.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import textwrap

import pytest
import torch

from segquant_fx import cli
from segquant_fx.ops import build as B
from segquant_fx.ops import cuda_kernels as ck

# --------------------------------------------------------------------------------------------------
# fixtures: a fake kernels_cuda tree and a fake nvcc
# --------------------------------------------------------------------------------------------------

_FAKE_NVCC = textwrap.dedent(
    """\
    import json, os, sys
    args = sys.argv[1:]
    with open(os.environ["FAKE_NVCC_LOG"], "a") as f:
        f.write(json.dumps(args) + "\\n")
    if "--version" in args:
        print("nvcc: NVIDIA (R) Cuda compiler driver")
        print("Cuda compilation tools, release 13.0, V13.0.88")
        sys.exit(0)
    if "-c" in args:
        src = args[args.index("-c") + 1]
        if "#error" in open(src).read():
            print(src + "(1): error: planted error", file=sys.stderr)
            sys.exit(2)
    with open(args[args.index("-o") + 1], "w") as f:
        f.write("fake output of " + " ".join(args))
    """
)


@pytest.fixture(autouse=True)
def _private_object_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(B.OBJ_CACHE_ENV, str(tmp_path / "objcache"))


@pytest.fixture
def fake_nvcc(tmp_path, monkeypatch):
    script = tmp_path / "bin" / "nvcc"
    script.parent.mkdir()
    script.write_text(f"#!{sys.executable}\n" + _FAKE_NVCC)
    script.chmod(0o755)
    log = tmp_path / "nvcc.log"
    monkeypatch.setenv("FAKE_NVCC_LOG", str(log))

    def calls():
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    return str(script), calls


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "kernels_cuda"
    (root / "include").mkdir(parents=True)
    (root / "src").mkdir()
    (root / "examples").mkdir()
    (root / "include" / "segquant_kernels.h").write_text("#define SQ_API_VERSION 1\n")
    (root / "src" / "common.cuh").write_text("// common\n")
    (root / "src" / "api.cu").write_text('#include "common.cuh"\nint a() { return 1; }\n')
    (root / "src" / "quantize.cu").write_text('#include "common.cuh"\nint q() { return 2; }\n')
    (root / "examples" / "gemm_example.cpp").write_text("int main() { return 0; }\n")
    return root


def _compiles(calls):
    return [c for c in calls if "-c" in c]


def _links(calls):
    return [c for c in calls if "-shared" in c]


# --------------------------------------------------------------------------------------------------
# architectures and flags
# --------------------------------------------------------------------------------------------------


def test_parse_archs():
    assert B.parse_archs("90a,80,89") == ("90a", "80", "89")
    assert B.parse_archs(" sm_90a , 80,80, compute_89 ") == ("90a", "80", "89")
    assert B.parse_archs(["90a"]) == ("90a",)


def test_parse_archs_default_and_env(monkeypatch):
    monkeypatch.delenv(B.ARCH_ENV, raising=False)
    assert B.parse_archs(None) == B.DEFAULT_ARCHS == ("90a", "80", "89")
    monkeypatch.setenv(B.ARCH_ENV, "90a")
    assert B.parse_archs(None) == ("90a",)


@pytest.mark.parametrize("bad", ["hopper", "9.0", "90ab", ",", "sm90"])
def test_parse_archs_rejects(bad):
    with pytest.raises(B.KernelBuildError, match=r"architecture"):
        B.parse_archs(bad)


def test_gencode_flags_use_the_gencode_form():
    assert B.gencode_flags(["90a", "80", "89"]) == [
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_89,code=sm_89",
    ]


def test_plan_and_commands(tree, fake_nvcc):
    nvcc, _ = fake_nvcc
    plan = B.plan_build("90a,80", nvcc=nvcc, root=tree)
    assert [p.name for p in plan.sources] == ["api.cu", "quantize.cu"]
    assert {p.name for p in plan.headers} == {"segquant_kernels.h", "common.cuh"}
    assert plan.nvcc_version.startswith("release 13.0")
    assert plan.build_dir == tree / "build"
    assert plan.library == tree / "build" / plan.digest / B.LIBRARY_NAME
    cmd = B.compile_command(plan, plan.sources[0], tree / "x.o", threads=4)
    for flag in (
        "-O3",
        "-std=c++17",
        "--expt-relaxed-constexpr",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_80,code=sm_80",
        f"-I{tree / 'include'}",
        f"-I{tree / 'src'}",
    ):
        assert flag in cmd
    assert cmd[cmd.index("-Xcompiler") + 1] == "-fPIC"
    assert cmd[cmd.index("--threads") + 1] == "2"
    assert cmd[-4:] == ["-c", str(plan.sources[0]), "-o", str(tree / "x.o")]
    link = B.link_command(plan, [tree / "a.o"], tree / "lib.so", tree / "exports.map")
    assert "-shared" in link
    assert link[link.index("-cudart") + 1] == "static"
    assert f"--version-script={tree / 'exports.map'}" in link
    assert "-lcuda" not in link
    ex = B.example_command(plan, tree / "examples" / "gemm_example.cpp", tree / "build", tree / "ex")
    assert "-lsegquant_kernels" in ex and "-rpath,$ORIGIN" in ex


def test_digest_depends_on_sources_headers_and_archs(tree, fake_nvcc):
    nvcc, _ = fake_nvcc
    d0 = B.plan_build("90a", nvcc=nvcc, root=tree).digest
    assert B.plan_build("90a", nvcc=nvcc, root=tree).digest == d0
    assert B.plan_build("90a,80", nvcc=nvcc, root=tree).digest != d0
    (tree / "src" / "common.cuh").write_text("// changed\n")
    d1 = B.plan_build("90a", nvcc=nvcc, root=tree).digest
    assert d1 != d0
    (tree / "include" / "segquant_kernels.h").write_text("#define SQ_API_VERSION 2\n")
    d2 = B.plan_build("90a", nvcc=nvcc, root=tree).digest
    assert d2 != d1
    (tree / "src" / "new.cu").write_text("int n() { return 3; }\n")
    assert B.plan_build("90a", nvcc=nvcc, root=tree).digest != d2


# --------------------------------------------------------------------------------------------------
# build: parallel objects, one link, cache, stable copy, atomicity
# --------------------------------------------------------------------------------------------------


def test_build_compiles_links_caches_and_copies(tree, fake_nvcc):
    nvcc, calls = fake_nvcc
    res = B.build("90a,80", nvcc=nvcc, root=tree, jobs=2)
    assert res.built
    assert res.library == tree / "build" / res.digest / B.LIBRARY_NAME
    assert res.library.is_file()
    assert res.stable_library == tree / "build" / B.LIBRARY_NAME
    assert res.stable_library.read_bytes() == res.library.read_bytes()
    manifest = json.loads((tree / "build" / B.MANIFEST_NAME).read_text())
    assert manifest["digest"] == res.digest and manifest["archs"] == ["90a", "80"]
    assert sorted(os.path.basename(c[c.index("-c") + 1]) for c in _compiles(calls())) == [
        "api.cu",
        "quantize.cu",
    ]
    assert len(_links(calls())) == 1
    # Only the cache folder, the stable copy and its manifest remain: no temporary folders.
    assert sorted(p.name for p in (tree / "build").iterdir()) == sorted(
        [res.digest, B.LIBRARY_NAME, B.MANIFEST_NAME]
    )
    assert sorted(p.name for p in res.library.parent.iterdir()) == [B.MANIFEST_NAME, B.LIBRARY_NAME]

    n_calls = len(calls())
    again = B.build("90a,80", nvcc=nvcc, root=tree)
    assert not again.built and again.digest == res.digest
    assert len(_compiles(calls()[n_calls:])) == 0 and len(_links(calls()[n_calls:])) == 0

    forced = B.build("90a,80", nvcc=nvcc, root=tree, force=True)
    assert forced.built and forced.digest == res.digest
    assert len(_links(calls()[n_calls:])) == 1

    (tree / "src" / "quantize.cu").write_text('#include "common.cuh"\nint q() { return 3; }\n')
    n_calls = len(calls())
    changed = B.build("90a,80", nvcc=nvcc, root=tree)
    assert changed.built and changed.digest != res.digest
    # Only the changed file is recompiled; api.cu comes from the object cache.
    assert [os.path.basename(c[c.index("-c") + 1]) for c in _compiles(calls()[n_calls:])] == ["quantize.cu"]
    assert json.loads((tree / "build" / B.MANIFEST_NAME).read_text())["digest"] == changed.digest
    assert changed.stable_library.read_bytes() == changed.library.read_bytes()


def test_header_change_recompiles_its_includers_and_old_builds_are_pruned(tree, fake_nvcc):
    nvcc, calls = fake_nvcc
    (tree / "src" / "solo.cu").write_text("int s() { return 4; }\n")
    digests = [B.build("90a", nvcc=nvcc, root=tree).digest]
    n_calls = len(calls())
    (tree / "src" / "common.cuh").write_text("// v2\n")
    digests.append(B.build("90a", nvcc=nvcc, root=tree).digest)
    compiled = sorted(os.path.basename(c[c.index("-c") + 1]) for c in _compiles(calls()[n_calls:]))
    assert compiled == ["api.cu", "quantize.cu"]  # solo.cu includes nothing that changed
    (tree / "src" / "common.cuh").write_text("// v3\n")
    digests.append(B.build("90a", nvcc=nvcc, root=tree).digest)
    assert len(set(digests)) == 3
    kept = sorted(d.name for d in (tree / "build").iterdir() if d.is_dir())
    assert len(kept) == B.KEEP_BUILDS and digests[-1] in kept and digests[0] not in kept


def test_local_includes(tree):
    (tree / "src" / "a.cuh").write_text('#include "b.cuh"\n#include <cuda.h>\n')
    (tree / "src" / "b.cuh").write_text('#include "segquant_kernels.h"\n')
    (tree / "src" / "main.cu").write_text('#include "a.cuh"\n')
    found = B.local_includes(tree / "src" / "main.cu", [tree / "include", tree / "src"])
    assert {p.name for p in found} == {"main.cu", "a.cuh", "b.cuh", "segquant_kernels.h"}


def test_build_restores_a_deleted_stable_copy_without_compiling(tree, fake_nvcc):
    nvcc, calls = fake_nvcc
    res = B.build("90a", nvcc=nvcc, root=tree)
    res.stable_library.unlink()
    n_calls = len(calls())
    again = B.build("90a", nvcc=nvcc, root=tree)
    assert not again.built and again.stable_library.is_file()
    assert not _compiles(calls()[n_calls:])


def test_build_into_out_dir(tree, fake_nvcc, tmp_path):
    nvcc, _ = fake_nvcc
    out = tmp_path / "elsewhere"
    res = B.build("80", nvcc=nvcc, root=tree, build_dir=out)
    assert res.library.parent.parent == out and (out / B.LIBRARY_NAME).is_file()
    assert not (tree / "build").exists()


def test_compile_error_names_the_command_and_leaves_no_library(tree, fake_nvcc):
    nvcc, _ = fake_nvcc
    (tree / "src" / "broken.cu").write_text("#error planted\n")
    with pytest.raises(B.KernelBuildError, match=r"compiling broken.cu failed \(exit code 2\)") as ei:
        B.build("90a", nvcc=nvcc, root=tree)
    assert "planted error" in str(ei.value) and "-gencode=arch=compute_90a,code=sm_90a" in str(ei.value)
    assert not (tree / "build" / B.LIBRARY_NAME).exists()
    assert [p.name for p in (tree / "build").iterdir()] == []


def test_no_sources(tmp_path, fake_nvcc):
    nvcc, _ = fake_nvcc
    (tmp_path / "k" / "src").mkdir(parents=True)
    with pytest.raises(B.KernelBuildError, match=r"no CUDA sources"):
        B.plan_build("90a", nvcc=nvcc, root=tmp_path / "k")


def test_missing_nvcc_is_a_clear_error(monkeypatch, tree):
    for var in ("NVCC", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(tree))
    monkeypatch.setattr(B, "_DEFAULT_NVCC_PATHS", ())
    with pytest.raises(B.KernelBuildError, match=r"nvcc \(the CUDA compiler\) was not found.*CUDA_HOME"):
        B.build("90a", root=tree)
    with pytest.raises(B.KernelBuildError, match=r"does not exist"):
        B.find_nvcc(tree / "no-nvcc")


def test_cuda_home_nvcc(monkeypatch, tmp_path, fake_nvcc):
    nvcc, _ = fake_nvcc
    monkeypatch.delenv("NVCC", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # fake_nvcc lives in tmp_path/bin/nvcc
    assert B.find_nvcc() == nvcc


def test_cutlass_required_only_when_included(monkeypatch, tree, fake_nvcc):
    nvcc, _ = fake_nvcc
    monkeypatch.delenv("CUTLASS_INCLUDE_DIR", raising=False)
    real_find_spec = B.importlib.util.find_spec
    monkeypatch.setattr(
        B.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "cutlass_library" else real_find_spec(name, *a),
    )
    plan = B.plan_build("90a", nvcc=nvcc, root=tree)  # no CUTLASS include in the sources: fine
    assert plan.cutlass_version == "none"
    (tree / "src" / "gemm.cuh").write_text('#pragma once\n#include "cutlass/cutlass.h"\n')
    with pytest.raises(B.KernelBuildError, match=r"pip install nvidia-cutlass"):
        B.plan_build("90a", nvcc=nvcc, root=tree)


def test_cutlass_include_dir_env(monkeypatch, tmp_path, tree, fake_nvcc):
    nvcc, _ = fake_nvcc
    inc = tmp_path / "cutlass_inc"
    (inc / "cutlass").mkdir(parents=True)
    (inc / "cutlass" / "cutlass.h").write_text("")
    (inc / "cutlass" / "version.h").write_text(
        "#define CUTLASS_MAJOR 4\n#define CUTLASS_MINOR 2\n#define CUTLASS_PATCH 1\n"
    )
    monkeypatch.setenv("CUTLASS_INCLUDE_DIR", str(inc))
    (tree / "src" / "gemm.cu").write_text("#include <cute/tensor.hpp>\n")
    plan = B.plan_build("90a", nvcc=nvcc, root=tree)
    assert plan.cutlass_version == "4.2.1"
    assert f"-I{inc}" in plan.compile_flags
    monkeypatch.setenv("CUTLASS_INCLUDE_DIR", str(tmp_path / "nothing"))
    with pytest.raises(B.KernelBuildError, match=r"CUTLASS_INCLUDE_DIR"):
        B.plan_build("90a", nvcc=nvcc, root=tree)


def test_the_package_finds_cutlass_when_installed():
    if B.importlib.util.find_spec("cutlass_library") is None:
        pytest.skip("nvidia-cutlass is not installed")
    inc = B.cutlass_include_dir(required=True)
    assert (inc / "cutlass" / "cutlass.h").is_file() and (inc / "cute" / "tensor.hpp").is_file()


def test_example_is_skipped_without_sq_gemm(tree, fake_nvcc):
    nvcc, _ = fake_nvcc
    res = B.build("90a", nvcc=nvcc, root=tree, example=True)
    assert res.example is None and res.example_note  # the fake library is not a loadable ELF file


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def test_cli_build_kernels(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake_build(archs, **kw):
        seen.update(kw, archs=archs)
        return B.BuildResult(
            library=tmp_path / "h" / B.LIBRARY_NAME,
            stable_library=tmp_path / B.LIBRARY_NAME,
            digest="0123456789abcdef",
            built=True,
            seconds=1.5,
            archs=("90a", "80"),
        )

    monkeypatch.setattr(B, "build", fake_build)
    rc = cli.main(["build-kernels", "--arch", "90a,80", "--out", str(tmp_path), "--force", "--jobs", "3"])
    assert rc == 0
    assert seen["archs"] == "90a,80" and seen["build_dir"] == str(tmp_path)
    assert seen["force"] is True and seen["jobs"] == 3 and seen["example"] is False
    out = capsys.readouterr().out
    assert "built [0123456789abcdef] archs=90a,80" in out


def test_cli_build_kernels_error(monkeypatch, capsys):
    def failing(*a, **kw):
        raise B.KernelBuildError("nvcc (the CUDA compiler) was not found")

    monkeypatch.setattr(B, "build", failing)
    assert cli.main(["build-kernels"]) == 1
    assert "build-kernels: error: nvcc (the CUDA compiler) was not found" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# ctypes binding
# --------------------------------------------------------------------------------------------------


def test_struct_layouts_match_the_header():
    assert ctypes.sizeof(ck.SqSegments) == 4 + 4 * (ck.MAX_SEGMENTS + 1)
    assert ck.SqSegments.offsets.offset == 4
    assert ctypes.sizeof(ck.SqScale) == 24
    assert (ck.SqScale.ptr.offset, ck.SqScale.row_stride.offset, ck.SqScale.seg_stride.offset) == (0, 8, 16)
    s = ck._segments_struct((3, 5, 8))
    assert s.n == 3 and list(s.offsets[:4]) == [0, 3, 8, 16]


def test_import_without_cuda_registers_nothing():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert not ck.is_available()
    assert "CUDA" in ck.unavailable_reason() or "libsegquant_kernels" in ck.unavailable_reason()
    assert ck.registered_ops() == ()


def test_missing_library_is_reported(monkeypatch, tmp_path):
    for name in ("_lib", "_lib_path", "_reason", "_has_gemm"):
        monkeypatch.setattr(ck, name, getattr(ck, name))
    monkeypatch.setenv(ck.ENV_LIBRARY, str(tmp_path / "nope.so"))
    monkeypatch.setattr(ck, "_repo_root", lambda: tmp_path)
    assert ck.candidate_paths()[:2] == [
        tmp_path / "nope.so",
        tmp_path / "kernels_cuda" / "build" / "libsegquant_kernels.so",
    ]
    ck._load()
    assert not ck.is_available() and ck.library_path() is None and not ck.has_gemm()
    reason = ck.unavailable_reason()
    assert "nope.so: not found" in reason and "segquant-fx build-kernels" in reason


def test_a_file_that_is_not_a_library_is_skipped(monkeypatch, tmp_path):
    for name in ("_lib", "_lib_path", "_reason", "_has_gemm"):
        monkeypatch.setattr(ck, name, getattr(ck, name))
    bogus = tmp_path / "libsegquant_kernels.so"
    bogus.write_text("not an ELF file")
    monkeypatch.setenv(ck.ENV_LIBRARY, str(bogus))
    monkeypatch.setattr(ck, "_repo_root", lambda: tmp_path)
    ck._load()
    assert ck.library_path() is None and str(bogus) in ck.unavailable_reason()


def test_cache_folder_is_searched_newest_first(monkeypatch, tmp_path):
    monkeypatch.delenv(ck.ENV_LIBRARY, raising=False)
    monkeypatch.setattr(ck, "_repo_root", lambda: tmp_path)
    old = tmp_path / "kernels_cuda" / "build" / "aaaa" / "libsegquant_kernels.so"
    new = tmp_path / "kernels_cuda" / "build" / "bbbb" / "libsegquant_kernels.so"
    for i, p in enumerate((old, new)):
        p.parent.mkdir(parents=True)
        p.write_text("x")
        os.utime(p, (1000 + i, 1000 + i))
    assert ck.candidate_paths()[1:] == [new, old]


# --------------------------------------------------------------------------------------------------
# the real library's argument checks (no GPU needed: they run before any CUDA call)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def real_lib():
    if ck._lib is None:
        pytest.skip(f"the kernel library is not built ({ck.unavailable_reason()})")
    return ck._lib


def _segs(*offsets):
    s = ck.SqSegments()
    s.n = len(offsets) - 1
    for i, o in enumerate(offsets):
        s.offsets[i] = o
    return s


def _quantize(lib, *, x=16, q=16, x_dtype=ck.SQ_BF16, q_dtype=ck.SQ_INT8, rows=2, k=8, segs=None, scale=16):
    return lib.sq_quantize(
        x, x_dtype, q, q_dtype, rows, k, ck.SqScale(scale, 0, 0), segs or _segs(0, k), None, None
    )


def test_library_api_version_and_strings(real_lib):
    assert real_lib.sq_api_version() == ck.API_VERSION
    assert real_lib.sq_status_string(ck.SQ_OK) == b"SQ_OK"
    assert real_lib.sq_status_string(ck.SQ_ERR_ARCH).startswith(b"SQ_ERR_ARCH")
    assert real_lib.sq_status_string(99) == b"unknown sq_status"


def test_library_exports_only_the_c_api(real_lib):
    for name in ("sq_quantize", "sq_quantize_dynamic", "sq_quantize_dual", "sq_last_error"):
        assert hasattr(real_lib, name)
    for name in ("cudaMalloc", "cudaLaunchKernel", "cudaGetLastError"):
        assert not hasattr(real_lib, name), (
            f"{name} leaks out of the library (static cudart must stay private)"
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"x": None}, b"must not be NULL"),
        ({"q": None}, b"must not be NULL"),
        ({"scale": None}, b"scale.ptr must not be NULL"),
        ({"x_dtype": ck.SQ_INT8}, b"x_dtype"),
        ({"q_dtype": ck.SQ_BF16}, b"q_dtype"),
        ({"q_dtype": ck.SQ_INT4, "k": 7, "segs": _segs(0, 7)}, b"K must be even"),
        ({"segs": _segs(0, 4)}, b"must equal K"),
        ({"segs": _segs(0, 5, 3, 8)}, b"increase strictly"),
        ({"segs": _segs(1, 8)}, b"offsets[0]"),
        ({"k": 0, "segs": _segs(0, 0)}, b"1 <= K"),
        ({"rows": -1}, b"rows >= 0"),
    ],
)
def test_library_rejects_bad_arguments(real_lib, kwargs, message):
    assert _quantize(real_lib, **kwargs) == ck.SQ_ERR_INVALID
    assert message in real_lib.sq_last_error()


def test_library_rejects_bad_segment_counts(real_lib):
    s = _segs(0, 8)
    s.n = 0
    assert _quantize(real_lib, segs=s) == ck.SQ_ERR_INVALID
    s.n = ck.MAX_SEGMENTS + 1
    assert _quantize(real_lib, segs=s) == ck.SQ_ERR_INVALID
    assert b"segs.n" in real_lib.sq_last_error()


def test_library_zero_rows_is_a_no_op(real_lib):
    assert _quantize(real_lib, x=None, q=None, rows=0) == ck.SQ_OK
    assert (
        real_lib.sq_quantize_dynamic(
            None, ck.SQ_FP32, None, ck.SQ_FP8E4M3, None, 0, 8, _segs(0, 8), None, None
        )
        == ck.SQ_OK
    )


def test_library_dynamic_and_dual_checks(real_lib):
    assert (
        real_lib.sq_quantize_dynamic(16, ck.SQ_FP32, 16, ck.SQ_INT8, None, 2, 8, _segs(0, 8), None, None)
        == ck.SQ_ERR_INVALID
    )
    assert b"scale_out" in real_lib.sq_last_error()
    assert (
        real_lib.sq_quantize_dual(
            16,
            ck.SQ_FP16,
            16,
            ck.SQ_INT4,
            2,
            8,
            ck.SqScale(16, 0, 0),
            ck.SqScale(None, 0, 0),
            _segs(0, 8),
            None,
            None,
        )
        == ck.SQ_ERR_INVALID
    )
    assert b"scale_neg" in real_lib.sq_last_error()


def test_library_gemm_path_switch(real_lib):
    if not hasattr(real_lib, "sq_set_gemm_path"):
        pytest.skip("library built before API version 2")
    assert real_lib.sq_set_gemm_path(ck.GEMM_PATHS["sm80"]) == ck.GEMM_PATHS["auto"]
    assert real_lib.sq_set_gemm_path(7) == ck.GEMM_PATHS["sm80"]  # unknown values only read the setting
    assert real_lib.sq_set_gemm_path(ck.GEMM_PATHS["auto"]) == ck.GEMM_PATHS["sm80"]


def test_library_gemm_without_a_device_is_an_arch_error(real_lib):
    if torch.cuda.is_available():
        pytest.skip("this checks the no-device answer")
    status = real_lib.sq_gemm(16, 16, ck.SQ_INT8, 16, ck.SQ_BF16, 8, 8, 16, 16, 16, None, None, 0, None)
    assert status == ck.SQ_ERR_ARCH
    if hasattr(real_lib, "sq_set_gemm_path"):
        assert b"no current CUDA device" in real_lib.sq_last_error()
