"""Load a script of ``benchmarks/`` as a module (the folder is not a package; its ``kernels.py`` would shadow
HF ``kernels`` if it were put on ``sys.path``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as module ``_bench_<name>`` (loaded once per session)."""
    mod_name = f"_bench_{name}"
    if mod_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(mod_name, ROOT / "benchmarks" / f"{name}.py")
        assert spec is not None and spec.loader is not None, name
        mod = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = mod  # dataclasses look their module up while the class is built
        spec.loader.exec_module(mod)
    return sys.modules[mod_name]
