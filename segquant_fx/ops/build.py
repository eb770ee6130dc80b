"""Build ``libsegquant_kernels.so`` (the CUDA/CUTLASS kernels of ``kernels_cuda/``) with nvcc.

One command from a fresh checkout::

    segquant-fx build-kernels                       # --arch 90a,80,89 by default
    segquant-fx build-kernels --arch 90a --jobs 8 --example

What it does:

1. Collects ``kernels_cuda/src/*.cu`` and hashes them together with every header
   (``kernels_cuda/include/*``, ``kernels_cuda/src/*.cuh``/``*.h``), the nvcc version, the compile
   and link flags, the architecture list and the CUTLASS version. The hash names the cache folder
   ``kernels_cuda/build/<hash>/``.
2. If ``<hash>/libsegquant_kernels.so`` exists (and not ``force``), nothing is compiled. Otherwise
   every ``.cu`` whose object is not in the object cache (:func:`object_cache_dir`, keyed by the
   file, the local headers it includes, nvcc and the flags) is compiled, in parallel (``jobs``);
   the objects are linked into ONE shared library (CUDA runtime linked statically, only the
   ``sq_*`` symbols exported) inside a temporary folder that is renamed to ``<hash>/`` at the end
   (atomic: a failed or concurrent build never leaves a half-written library behind). Only the
   :data:`KEEP_BUILDS` newest ``<hash>/`` folders are kept, so the build folder stays small enough
   to carry to a GPU machine.
3. Copies the library to the stable path ``kernels_cuda/build/libsegquant_kernels.so`` (atomic
   rename) with a ``libsegquant_kernels.json`` manifest beside it; the binding
   (:mod:`segquant_fx.ops.cuda_kernels`) loads that path.
4. With ``example=True``, also builds ``kernels_cuda/examples/gemm_example.cpp`` against the
   library into ``<hash>/gemm_example`` and copies it to ``kernels_cuda/build/gemm_example``
   (``rpath=$ORIGIN``, so it finds the library beside it). This needs ``sq_gemm`` in the library.

Architectures are given as ``90a``, ``80``, ``89`` (also ``sm_90a``); each becomes
``-gencode=arch=compute_XX,code=sm_XX``. Every ``.cu`` is compiled for every architecture: code
that needs one architecture (the sm_90a GEMM) guards itself and reports ``SQ_ERR_ARCH`` elsewhere.

The CUTLASS headers come from the ``nvidia-cutlass`` PyPI package (``cutlass_library/source/include``)
or from ``$CUTLASS_INCLUDE_DIR``; they are required only when a source includes ``cutlass/`` or
``cute/`` headers.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from segquant_fx.errors import SegQuantError

__all__ = [
    "KernelBuildError",
    "BuildPlan",
    "BuildResult",
    "DEFAULT_ARCHS",
    "LIBRARY_NAME",
    "EXAMPLE_NAME",
    "repo_root",
    "kernels_root",
    "default_build_dir",
    "stable_library_path",
    "parse_archs",
    "gencode_flags",
    "find_nvcc",
    "cutlass_include_dir",
    "plan_build",
    "compile_command",
    "link_command",
    "example_command",
    "build",
    "build_example",
]

#: Architectures compiled by default: Hopper (sm_90a: wgmma/TMA GEMM), Ampere, Ada.
DEFAULT_ARCHS: tuple[str, ...] = ("90a", "80", "89")
#: Environment variable overriding the default architecture list (same syntax as ``--arch``).
ARCH_ENV = "SEGQUANT_KERNELS_ARCH"
#: File name of the shared library.
LIBRARY_NAME = "libsegquant_kernels.so"
#: File name of the C++ example program.
EXAMPLE_NAME = "gemm_example"
MANIFEST_NAME = "libsegquant_kernels.json"

_BASE_FLAGS: tuple[str, ...] = (
    "-O3",
    "-std=c++17",
    "--expt-relaxed-constexpr",
    "-DNDEBUG",
    "-Xcompiler",
    "-fPIC",
)
_HEADER_SUFFIXES = (".h", ".hpp", ".cuh")
_DEFAULT_NVCC_PATHS: tuple[str, ...] = ("/usr/local/cuda/bin/nvcc",)
_LOCAL_INCLUDE_RE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)
#: Environment variable naming the per-object compile cache folder.
OBJ_CACHE_ENV = "SEGQUANT_KERNELS_OBJ_CACHE"
#: ``<hash>/`` folders kept in the build folder (the newest; older ones are deleted after a build).
KEEP_BUILDS = 2
_CUTLASS_INCLUDE_RE = re.compile(r'^\s*#\s*include\s*[<"](cutlass|cute)/', re.MULTILINE)
_ARCH_RE = re.compile(r"^(?:sm_|compute_)?(\d{2,3})([a-z]?)$")


class KernelBuildError(SegQuantError, RuntimeError):
    """The kernel library could not be built (missing nvcc or CUTLASS, a compile or link error)."""


def repo_root() -> Path:
    """The checkout root: the parent of the ``segquant_fx`` package folder."""
    return Path(__file__).resolve().parents[2]


def kernels_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The ``kernels_cuda`` folder (``include/``, ``src/``, ``examples/``, ``build/``)."""
    return Path(root) if root is not None else repo_root() / "kernels_cuda"


def default_build_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """``kernels_cuda/build``: holds ``<hash>/`` cache folders and the stable library copy."""
    return kernels_root(root) / "build"


def stable_library_path(build_dir: str | os.PathLike[str] | None = None) -> Path:
    """The stable library path ``<build_dir>/libsegquant_kernels.so``."""
    return (Path(build_dir) if build_dir is not None else default_build_dir()) / LIBRARY_NAME


def parse_archs(spec: str | Sequence[str] | None = None) -> tuple[str, ...]:
    """Parse an architecture list such as ``"90a,80,89"`` (or ``["sm_90a", "80"]``).

    ``None`` means ``$SEGQUANT_KERNELS_ARCH`` if set, else :data:`DEFAULT_ARCHS`. Duplicates are
    dropped, order is kept.

    Raises:
        KernelBuildError: an entry is not of the form ``NN``/``NNa`` (optionally ``sm_``-prefixed).

    Example:
        >>> parse_archs("sm_90a, 80")
        ('90a', '80')
    """
    if spec is None:
        spec = os.environ.get(ARCH_ENV) or ",".join(DEFAULT_ARCHS)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        raw = str(item).strip().lower()
        if not raw:
            continue
        m = _ARCH_RE.match(raw)
        if m is None:
            raise KernelBuildError(
                f"unknown CUDA architecture {item!r}; use compute capabilities such as 90a, 80, 89 "
                f"(comma-separated, e.g. --arch 90a,80)"
            )
        arch = m.group(1) + m.group(2)
        if arch not in out:
            out.append(arch)
    if not out:
        raise KernelBuildError(f"empty architecture list {spec!r}; pass e.g. --arch 90a")
    return tuple(out)


def gencode_flags(archs: Sequence[str]) -> list[str]:
    """``-gencode=arch=compute_XX,code=sm_XX`` for each architecture (the form HOPPER.md asks for).

    Example:
        >>> gencode_flags(["90a", "80"])
        ['-gencode=arch=compute_90a,code=sm_90a', '-gencode=arch=compute_80,code=sm_80']
    """
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in parse_archs(list(archs))]


def find_nvcc(nvcc: str | os.PathLike[str] | None = None) -> str:
    """Locate nvcc: the argument, ``$NVCC``, ``$CUDA_HOME/bin``, ``$CUDA_PATH/bin``, ``PATH``, ``/usr/local/cuda/bin``.

    Raises:
        KernelBuildError: none found.
    """
    candidates: list[str] = []
    if nvcc is not None:
        candidates.append(str(nvcc))
    if os.environ.get("NVCC"):
        candidates.append(os.environ["NVCC"])
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    which = shutil.which("nvcc")
    if which:
        candidates.append(which)
    candidates.extend(_DEFAULT_NVCC_PATHS)
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
        found = shutil.which(c) if os.sep not in c else None
        if found:
            return found
    if nvcc is not None:
        raise KernelBuildError(f"nvcc {str(nvcc)!r} does not exist or is not executable")
    raise KernelBuildError(
        "nvcc (the CUDA compiler) was not found; install the CUDA toolkit (12.4 or newer) and put its bin/ "
        "on PATH, or set CUDA_HOME (nvcc = $CUDA_HOME/bin/nvcc) or NVCC"
    )


def cutlass_include_dir(required: bool = True) -> Path | None:
    """The CUTLASS include folder: ``$CUTLASS_INCLUDE_DIR``, else the ``nvidia-cutlass`` package's.

    Args:
        required: Raise when not found (else return None).

    Raises:
        KernelBuildError: not found and ``required``, with the ``pip install nvidia-cutlass`` hint.
    """
    env = os.environ.get("CUTLASS_INCLUDE_DIR")
    if env:
        p = Path(env)
        if (p / "cutlass" / "cutlass.h").is_file():
            return p
        if required:
            raise KernelBuildError(f"CUTLASS_INCLUDE_DIR={env!r} has no cutlass/cutlass.h")
        return None
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.origin:
        p = Path(spec.origin).parent / "source" / "include"
        if (p / "cutlass" / "cutlass.h").is_file():
            return p
    if required:
        raise KernelBuildError(
            "the CUTLASS headers were not found (the GEMM kernels need them); install them with "
            "`pip install nvidia-cutlass` (CUTLASS 4.x, headers in cutlass_library/source/include) or set "
            "CUTLASS_INCLUDE_DIR to a folder holding cutlass/cutlass.h"
        )
    return None


def _cutlass_version(include: Path | None) -> str:
    if include is None:
        return "none"
    try:
        text = (include / "cutlass" / "version.h").read_text(errors="replace")
    except OSError:
        return "unknown"
    parts = [re.search(rf"#define\s+CUTLASS_{k}\s+(\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) if m else "?" for m in parts)


def _nvcc_version(nvcc: str) -> str:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except OSError as e:
        raise KernelBuildError(f"running {nvcc} --version failed: {e}") from None
    text = (out.stdout + out.stderr).strip()
    m = re.search(r"release [^\n]*", text)
    return m.group(0) if m else text[-200:]


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """Everything that determines one build (and its hash).

    Attributes:
        kernels_root: The ``kernels_cuda`` folder.
        build_dir: Root of the cache (``<build_dir>/<hash>/``) and of the stable copy.
        nvcc: Path of nvcc.
        nvcc_version: nvcc's ``release ...`` line.
        archs: Architecture list (``"90a"``, ...).
        sources: The ``.cu`` files, sorted.
        headers: The headers hashed with them.
        include_dirs: ``-I`` folders (``include/``, ``src/``, CUTLASS).
        compile_flags: Flags of every object compile (without ``-c``/``-o``/``--threads``).
        link_flags: Flags of the link step (without objects/``-o``).
        cutlass_version: ``MAJOR.MINOR.PATCH`` of the CUTLASS headers used, or ``none``.
        digest: First 16 hex digits of the SHA-256 of all of the above and the files' contents.
    """

    kernels_root: Path
    build_dir: Path
    nvcc: str
    nvcc_version: str
    archs: tuple[str, ...]
    sources: tuple[Path, ...]
    headers: tuple[Path, ...]
    include_dirs: tuple[Path, ...]
    compile_flags: tuple[str, ...]
    link_flags: tuple[str, ...]
    cutlass_version: str
    digest: str

    @property
    def out_dir(self) -> Path:
        """``<build_dir>/<digest>``: the cache folder of this configuration."""
        return self.build_dir / self.digest

    @property
    def library(self) -> Path:
        """``<build_dir>/<digest>/libsegquant_kernels.so``."""
        return self.out_dir / LIBRARY_NAME


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """Outcome of :func:`build`.

    Attributes:
        library: The cached library (``<build_dir>/<hash>/libsegquant_kernels.so``).
        stable_library: The stable copy (``<build_dir>/libsegquant_kernels.so``).
        digest: The configuration hash.
        built: False when the cached library was reused.
        seconds: Wall time of the call.
        archs: The architectures compiled in.
        example: Path of the stable example binary, if built.
        example_note: Why the example was not built, if it was asked for and skipped.
    """

    library: Path
    stable_library: Path
    digest: str
    built: bool
    seconds: float
    archs: tuple[str, ...]
    example: Path | None = None
    example_note: str | None = None


def _needs_cutlass(sources: Sequence[Path], headers: Sequence[Path]) -> bool:
    for f in (*sources, *headers):
        try:
            if _CUTLASS_INCLUDE_RE.search(f.read_text(errors="replace")):
                return True
        except OSError:
            continue
    return False


def plan_build(
    archs: str | Sequence[str] | None = None,
    *,
    build_dir: str | os.PathLike[str] | None = None,
    nvcc: str | os.PathLike[str] | None = None,
    root: str | os.PathLike[str] | None = None,
) -> BuildPlan:
    """Resolve tools, sources and flags, and hash them (compiles nothing).

    Raises:
        KernelBuildError: no sources, nvcc missing, or CUTLASS missing while a source needs it.
    """
    kroot = kernels_root(root)
    src_dir = kroot / "src"
    inc_dir = kroot / "include"
    sources = tuple(sorted(src_dir.glob("*.cu")))
    if not sources:
        raise KernelBuildError(f"no CUDA sources (*.cu) in {src_dir}")
    headers = tuple(
        sorted(
            p
            for d in (inc_dir, src_dir)
            if d.is_dir()
            for p in d.iterdir()
            if p.is_file() and p.suffix in _HEADER_SUFFIXES
        )
    )
    arch_list = parse_archs(archs)
    nvcc_path = find_nvcc(nvcc)
    nvcc_ver = _nvcc_version(nvcc_path)
    cutlass = cutlass_include_dir(required=_needs_cutlass(sources, headers))
    include_dirs = [inc_dir, src_dir]
    if cutlass is not None:
        include_dirs.append(cutlass)
        util = cutlass.parent / "tools" / "util" / "include"
        if util.is_dir():
            include_dirs.append(util)
    compile_flags = (
        *_BASE_FLAGS,
        *(f"-I{d}" for d in include_dirs),
        *gencode_flags(arch_list),
    )
    link_flags = (
        "-shared",
        "-cudart",
        "static",
        "-Xlinker",
        f"-soname={LIBRARY_NAME}",
        "-Xlinker",
        "-Bsymbolic",
        "-Xlinker",
        "--no-undefined",
    )
    h = hashlib.sha256()
    for label, value in (
        ("nvcc", nvcc_ver),
        ("archs", ",".join(arch_list)),
        # Include folders are machine-specific paths; hash what they mean, not where they are.
        ("compile", " ".join(f for f in compile_flags if not f.startswith("-I"))),
        ("link", " ".join(link_flags)),
        ("cutlass", _cutlass_version(cutlass)),
    ):
        h.update(f"{label}={value}\n".encode())
    for f in (*sources, *headers):
        h.update(f"file={f.relative_to(kroot).as_posix()}\n".encode())
        h.update(f.read_bytes())
        h.update(b"\n")
    return BuildPlan(
        kernels_root=kroot,
        build_dir=Path(build_dir) if build_dir is not None else default_build_dir(kroot),
        nvcc=nvcc_path,
        nvcc_version=nvcc_ver,
        archs=arch_list,
        sources=sources,
        headers=headers,
        include_dirs=tuple(include_dirs),
        compile_flags=tuple(compile_flags),
        link_flags=link_flags,
        cutlass_version=_cutlass_version(cutlass),
        digest=h.hexdigest()[:16],
    )


def compile_command(plan: BuildPlan, source: Path, obj: Path, threads: int = 1) -> list[str]:
    """The nvcc command compiling one ``.cu`` to an object (``--threads`` splits the gencodes)."""
    cmd = [plan.nvcc, *plan.compile_flags]
    if threads > 1 and len(plan.archs) > 1:
        cmd += ["--threads", str(min(threads, len(plan.archs)))]
    return [*cmd, "-c", str(source), "-o", str(obj)]


def link_command(plan: BuildPlan, objects: Sequence[Path], out: Path, version_script: Path) -> list[str]:
    """The nvcc command linking the objects into the shared library (only ``sq_*`` exported)."""
    return [
        plan.nvcc,
        *plan.link_flags,
        "-Xlinker",
        f"--version-script={version_script}",
        *map(str, objects),
        "-o",
        str(out),
    ]


def example_command(plan: BuildPlan, source: Path, library_dir: Path, out: Path) -> list[str]:
    """The nvcc command building the C++ example against ``library_dir/libsegquant_kernels.so``."""
    return [
        plan.nvcc,
        "-O2",
        "-std=c++17",
        f"-I{plan.kernels_root / 'include'}",
        str(source),
        "-o",
        str(out),
        f"-L{library_dir}",
        "-lsegquant_kernels",
        "-cudart",
        "static",
        "-Xlinker",
        "-rpath,$ORIGIN",
    ]


_VERSION_SCRIPT = "{\n  global:\n    sq_*;\n  local:\n    *;\n};\n"


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=cwd)
    except OSError as e:
        raise KernelBuildError(f"{what}: could not run {cmd[0]}: {e}") from None
    if proc.returncode != 0:
        log = (proc.stdout + proc.stderr).strip()
        if len(log) > 8000:
            log = "...\n" + log[-8000:]
        raise KernelBuildError(f"{what} failed (exit code {proc.returncode}):\n  {' '.join(cmd)}\n{log}")


def _atomic_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def _atomic_write(dst: Path, text: str) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, dst)


def _manifest(plan: BuildPlan, seconds: float | None) -> dict[str, object]:
    return {
        "digest": plan.digest,
        "library": LIBRARY_NAME,
        "archs": list(plan.archs),
        "nvcc": plan.nvcc_version,
        "cutlass": plan.cutlass_version,
        "sources": [p.relative_to(plan.kernels_root).as_posix() for p in plan.sources],
        "compile_flags": [f for f in plan.compile_flags if not f.startswith("-I")],
        "link_flags": list(plan.link_flags),
        "build_seconds": seconds,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": sys.version.split()[0],
    }


def _manifest_digest(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("digest")
    except (OSError, ValueError, AttributeError):
        return None


def object_cache_dir() -> Path:
    """Per-object compile cache: ``$SEGQUANT_KERNELS_OBJ_CACHE``, else ``~/.cache/segquant_fx/kernel-objects``.

    Outside the checkout on purpose: ``kernels_cuda/build`` is carried to GPU machines and must stay
    small (only the libraries, see :data:`KEEP_BUILDS`).
    """
    env = os.environ.get(OBJ_CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "segquant_fx" / "kernel-objects"


def local_includes(source: Path, search_dirs: Sequence[Path]) -> list[Path]:
    """``source`` and every file it includes with ``#include "..."`` found in ``search_dirs`` (transitively)."""
    seen: list[Path] = []
    todo = [source]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.append(f)
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        for name in _LOCAL_INCLUDE_RE.findall(text):
            for d in (f.parent, *search_dirs):
                cand = d / name
                if cand.is_file():
                    todo.append(cand.resolve())
                    break
    return seen


def object_key(plan: BuildPlan, source: Path) -> str:
    """Hash of what one object depends on: its source and local headers, nvcc, flags, CUTLASS."""
    h = hashlib.sha256()
    h.update(f"nvcc={plan.nvcc_version}\ncutlass={plan.cutlass_version}\n".encode())
    h.update(" ".join(f for f in plan.compile_flags if not f.startswith("-I")).encode())
    for f in sorted(local_includes(source.resolve(), plan.include_dirs[:2])):
        h.update(f"\nfile={f.name}\n".encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _compile_all(plan: BuildPlan, jobs: int, force: bool, log: bool) -> list[Path]:
    """Compile every source whose object is not cached (in parallel); return the object paths."""
    cache = object_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    objects = [cache / f"{s.stem}-{object_key(plan, s)}.o" for s in plan.sources]
    todo = [(s, o) for s, o in zip(plan.sources, objects, strict=True) if force or not o.is_file()]
    if log and len(todo) < len(objects):
        print(f"  {len(objects) - len(todo)} of {len(objects)} objects cached in {cache}", file=sys.stderr)
    if not todo:
        return objects
    workers = max(1, min(jobs, len(todo)))
    threads = max(1, jobs // workers)

    def one(src_obj: tuple[Path, Path]) -> Path:
        src, obj = src_obj
        t0 = time.perf_counter()
        tmp = obj.with_name(f".{obj.name}.tmp-{os.getpid()}")
        try:
            _run(compile_command(plan, src, tmp, threads), f"compiling {src.name}")
            os.replace(tmp, obj)
        finally:
            if tmp.exists():
                tmp.unlink()
        if log:
            print(f"  compiled {src.name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        return obj

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(one, pair) for pair in todo]
        errors = []
        for fut in futures:
            try:
                fut.result()
            except KernelBuildError as e:
                errors.append(str(e))
    if errors:
        raise KernelBuildError("\n\n".join(errors))
    return objects


def _prune_builds(plan: BuildPlan, keep: int) -> None:
    """Delete all but the ``keep`` newest ``<hash>/`` folders (the current one always stays)."""
    dirs = [
        d
        for d in plan.build_dir.iterdir()
        if d.is_dir() and re.fullmatch(r"[0-9a-f]{16}", d.name) and (d / LIBRARY_NAME).is_file()
    ]
    dirs.sort(key=lambda d: (d.name == plan.digest, d.stat().st_mtime), reverse=True)
    for d in dirs[max(1, keep) :]:
        shutil.rmtree(d, ignore_errors=True)


def build(
    archs: str | Sequence[str] | None = None,
    *,
    build_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    jobs: int | None = None,
    nvcc: str | os.PathLike[str] | None = None,
    root: str | os.PathLike[str] | None = None,
    example: bool = False,
    log: bool = False,
) -> BuildResult:
    """Build (or reuse) ``libsegquant_kernels.so`` and refresh the stable copy.

    Args:
        archs: Architecture list (``"90a,80,89"``); None: ``$SEGQUANT_KERNELS_ARCH`` or the default.
        build_dir: Cache root (default ``kernels_cuda/build``).
        force: Rebuild even when the cached library for this hash exists.
        jobs: Parallel compile jobs (default: the CPU count).
        nvcc: Path of nvcc (default: see :func:`find_nvcc`).
        root: The ``kernels_cuda`` folder (default: the checkout's).
        example: Also build the C++ example (see :func:`build_example`).
        log: Print progress to stderr.

    Returns:
        A :class:`BuildResult`.

    Raises:
        KernelBuildError: missing tools or sources, or a compile/link error (with the command and
            the compiler's output).
    """
    t0 = time.perf_counter()
    plan = plan_build(archs, build_dir=build_dir, nvcc=nvcc, root=root)
    jobs = max(1, jobs if jobs is not None else (os.cpu_count() or 1))
    plan.build_dir.mkdir(parents=True, exist_ok=True)
    built = False
    if force or not plan.library.is_file():
        if log:
            print(
                f"building {LIBRARY_NAME} [{plan.digest}] for {','.join(plan.archs)} from "
                f"{len(plan.sources)} sources ({plan.nvcc_version})",
                file=sys.stderr,
            )
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{plan.digest}-", dir=plan.build_dir))
        tmp.chmod(0o755)  # mkdtemp makes it private; the renamed cache folder should be readable
        try:
            objects = _compile_all(plan, jobs, force, log)
            script = tmp / "exports.map"
            script.write_text(_VERSION_SCRIPT)
            _run(link_command(plan, objects, tmp / LIBRARY_NAME, script), f"linking {LIBRARY_NAME}")
            script.unlink()
            (tmp / MANIFEST_NAME).write_text(json.dumps(_manifest(plan, time.perf_counter() - t0), indent=2))
            if plan.out_dir.exists():  # force, or another process finished the same build first
                old = plan.build_dir / f".old-{plan.digest}-{os.getpid()}"
                os.replace(plan.out_dir, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, plan.out_dir)
            built = True
            _prune_builds(plan, KEEP_BUILDS)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    stable = stable_library_path(plan.build_dir)
    stable_manifest = plan.build_dir / MANIFEST_NAME
    if built or not stable.is_file() or _manifest_digest(stable_manifest) != plan.digest:
        manifest_path = plan.out_dir / MANIFEST_NAME
        manifest = manifest_path.read_text() if manifest_path.is_file() else json.dumps(_manifest(plan, None))
        _atomic_copy(plan.library, stable)
        _atomic_write(stable_manifest, manifest)
    example_path: Path | None = None
    example_note: str | None = None
    if example:
        example_path, example_note = build_example(plan, force=force or built)
    if log:
        print(f"{'built' if built else 'up to date'}: {stable} -> {plan.library}", file=sys.stderr)
    return BuildResult(
        library=plan.library,
        stable_library=stable,
        digest=plan.digest,
        built=built,
        seconds=time.perf_counter() - t0,
        archs=plan.archs,
        example=example_path,
        example_note=example_note,
    )


def _exports_symbol(library: Path, symbol: str) -> bool:
    """Whether the shared library defines ``symbol`` (ctypes, in a child process; needs no GPU)."""
    code = "import ctypes, sys; sys.exit(0 if hasattr(ctypes.CDLL(sys.argv[1]), sys.argv[2]) else 1)"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, str(library), symbol], capture_output=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def build_example(plan: BuildPlan, *, force: bool = False) -> tuple[Path | None, str | None]:
    """Build ``kernels_cuda/examples/gemm_example.cpp`` against the plan's library.

    The binary goes to ``<hash>/gemm_example`` and is copied to ``<build_dir>/gemm_example``; both
    find the library beside them (``rpath=$ORIGIN``). The example calls ``sq_gemm``, so it is
    skipped (with a note) when the library was built without the GEMM.

    Returns:
        ``(stable binary path, None)``, or ``(None, why it was skipped)``.

    Raises:
        KernelBuildError: the example does not compile or link.
    """
    source = plan.kernels_root / "examples" / "gemm_example.cpp"
    if not source.is_file():
        return None, f"{source} does not exist"
    if not plan.library.is_file():
        return None, f"{plan.library} is not built"
    if not _exports_symbol(plan.library, "sq_gemm"):
        return None, (
            f"{plan.library} has no sq_gemm (kernels_cuda/src/gemm_sm90.cu is not there yet); "
            f"the example needs the GEMM"
        )
    binary = plan.out_dir / EXAMPLE_NAME
    stamp = plan.out_dir / f"{EXAMPLE_NAME}.sha256"
    digest = hashlib.sha256(
        source.read_bytes() + " ".join(example_command(plan, source, plan.out_dir, binary)).encode()
    )
    digest_hex = digest.hexdigest()
    if force or not binary.is_file() or not stamp.is_file() or stamp.read_text().strip() != digest_hex:
        tmp = plan.out_dir / f".{EXAMPLE_NAME}.tmp-{os.getpid()}"
        try:
            _run(example_command(plan, source, plan.out_dir, tmp), f"building {source.name}")
            os.replace(tmp, binary)
        finally:
            if tmp.exists():
                tmp.unlink()
        stamp.write_text(digest_hex + "\n")
    stable = plan.build_dir / EXAMPLE_NAME
    _atomic_copy(binary, stable)
    return stable, None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m segquant_fx.ops.build`` (same options as ``segquant-fx build-kernels``)."""
    p = argparse.ArgumentParser(prog="python -m segquant_fx.ops.build", description=__doc__.split("\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return run_from_args(args)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``build-kernels`` options to an argparse parser."""
    p.add_argument("--arch", default=None, help=f"comma-separated archs (default {','.join(DEFAULT_ARCHS)})")
    p.add_argument("--out", default=None, help="build folder (default kernels_cuda/build)")
    p.add_argument("--force", action="store_true", help="rebuild even if the cached library is up to date")
    p.add_argument("--jobs", "-j", type=int, default=None, help="parallel compile jobs (default: CPU count)")
    p.add_argument("--nvcc", default=None, help="path of nvcc (default: CUDA_HOME, PATH)")
    p.add_argument("--example", action="store_true", help="also build kernels_cuda/examples/gemm_example")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the library path")


def run_from_args(args: argparse.Namespace) -> int:
    """Run a build from parsed ``build-kernels`` options; prints the result, returns the exit code."""
    try:
        res = build(
            args.arch,
            build_dir=args.out,
            force=args.force,
            jobs=args.jobs,
            nvcc=args.nvcc,
            example=args.example,
            log=not args.quiet,
        )
    except KernelBuildError as e:
        print(f"segquant-fx build-kernels: error: {e}", file=sys.stderr)
        return 1
    if args.quiet:
        print(res.stable_library)
        return 0
    state = "built" if res.built else "up to date (cached)"
    print(f"{res.stable_library}: {state} [{res.digest}] archs={','.join(res.archs)} in {res.seconds:.1f} s")
    print(f"  cache: {res.library}")
    if args.example:
        print(f"  example: {res.example}" if res.example else f"  example skipped: {res.example_note}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
