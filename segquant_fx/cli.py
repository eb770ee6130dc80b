"""Command line: ``segquant-fx <command>``.

Commands:

* ``quantize [--model NAME] [--preset w8a8] [--calib-items N] [--out DIR]``: quantize a built-in model
  (default ``tiny-sd35``) or a user factory, print the per-layer plan and the output error vs float.
* ``calibrate`` / ``generate``, and ``quantize --pipeline|--calib-set|--config``: the diffusion
  workflow (see :mod:`segquant_fx.workflow_cli`).
* ``inspect --model NAME|path/to/file.py:factory [--json] [--debug] [--batch-size N] [--patterns a,b]``:
  capture the model and print its SegQuant pattern report. ``NAME`` is a built-in config
  (``segquant-fx inspect --list``); a user factory returns ``(model, example)`` or a model, in which
  case the file must also define ``example_inputs()``.
* ``build-kernels [--arch 90a,80,89] [--out DIR] [--force] [--jobs N] [--example]``: compile
  ``kernels_cuda/`` into ``libsegquant_kernels.so`` (see :mod:`segquant_fx.ops.build`).
* ``export-onnx --model NAME|path/to/file.py:factory [--preset w8a8] [--format qdq|segquant] --out FILE``:
  quantize a model (built-ins calibrate on ``calibration_items``) and export it to ONNX
  (see :mod:`segquant_fx.export.onnx`).
* ``dataset prepare --dataset coco|mjhq|dci --src DIR --out DIR [--control canny] [--sample-size N]
  [--per-category] [--blur K] [--seed S]``: sample a local dataset copy into the unified prompt/image/control
  format (see :mod:`segquant_fx.datasets`).
* ``demo [--model mmdit] [--config w8a8] [--out segquant-demo]``: quantize a built-in text-to-image model,
  write a float-vs-quantized image grid, metrics, the plan and the ONNX export (see :mod:`segquant_fx.t2i.demo`).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

from segquant_fx.errors import SegQuantError

__all__ = ["main", "load_model_arg"]


def load_model_arg(spec: str, batch_size: int = 1) -> tuple[Any, Any]:
    """Resolve ``--model``: a built-in name, or ``file.py:factory``.

    Raises:
        SegQuantError: If the name is unknown, the file or factory is missing, or the factory returns
            something else than a model (with an example).
    """
    from segquant_fx.errors import ConfigError

    if ":" in spec and spec.split(":", 1)[0].endswith(".py"):
        path_s, factory_name = spec.rsplit(":", 1)
        path = Path(path_s)
        if not path.is_file():
            raise ConfigError(f"--model {spec!r}: file {path} does not exist")
        mod_spec = importlib.util.spec_from_file_location(f"_segquant_user_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
        mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
        factory = getattr(module, factory_name, None)
        if not callable(factory):
            raise ConfigError(f"--model {spec!r}: {path} has no callable {factory_name!r}")
        out = factory()
        if isinstance(out, tuple) and len(out) == 2:
            return out
        example_fn = getattr(module, "example_inputs", None)
        if example_fn is None:
            raise ConfigError(
                f"--model {spec!r}: {factory_name}() returned a {type(out).__name__}; return (model, example) "
                "or define example_inputs() in the file"
            )
        return out, example_fn()
    from segquant_fx.models import build_model

    return build_model(spec, batch_size=batch_size)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from segquant_fx.report import find_patterns

    if args.list:
        from segquant_fx.models import MODELS

        for name, spec in MODELS.items():
            print(f"{name:24s} {'(full size) ' if spec.full else ''}{spec.description}")
        return 0
    if not args.model:
        print("segquant-fx inspect: --model is required (or --list)", file=sys.stderr)
        return 2
    model, example = load_model_arg(args.model, args.batch_size)
    patterns = args.patterns.split(",") if args.patterns else None
    report = find_patterns(model, example, patterns=patterns, debug=args.debug, dynamic=not args.static)
    if args.json:
        print(report.to_json())
    else:
        print(report.to_markdown())
        if args.debug and report.rejections:
            print("Rejected candidates:")
            for r in report.rejections:
                print(f"- {r}")
        t = report.timings
        print(f"capture {t['capture']:.2f} s, matching {t['matching']:.2f} s")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    import time

    import torch

    from segquant_fx.api import quantize

    model, example = load_model_arg(args.model, args.batch_size)
    if args.model.endswith(".py") or ":" in args.model:
        items = [example] * args.calib_items
    else:
        from segquant_fx.models import calibration_items

        items = calibration_items(args.model, args.calib_items, args.batch_size)
    t0 = time.perf_counter()
    qmodel = quantize(model, items, args.preset, progress=not args.quiet)
    dt = time.perf_counter() - t0
    with torch.no_grad():
        ref = model(**example) if isinstance(example, dict) else model(*example)
        out = qmodel(**example) if isinstance(example, dict) else qmodel(*example)
    from torch.utils import _pytree as pytree

    r, o = pytree.tree_leaves(ref)[0].float(), pytree.tree_leaves(out)[0].float()
    rel = float((o - r).norm() / r.norm().clamp_min(1e-12))
    print(qmodel.report())
    print(f"{args.model}: {len(qmodel.plan)} layers quantized with {args.preset} in {dt:.1f} s; "
          f"output relative error vs float {rel:.4f}")
    if args.out:
        qmodel.save(args.out)
        print(f"saved to {args.out}")
    return 0


def _cmd_build_kernels(args: argparse.Namespace) -> int:
    from segquant_fx.ops import build

    return build.run_from_args(args)


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    from segquant_fx.api import quantize
    from segquant_fx.export.onnx import export_onnx

    model, example = load_model_arg(args.model, args.batch_size)
    if args.model.endswith(".py") or ":" in args.model:
        items = [example] * args.calib_items
    else:
        from segquant_fx.models import calibration_items

        items = calibration_items(args.model, args.calib_items, args.batch_size)
    qmodel = quantize(model, items, args.preset, progress=not args.quiet)
    path = export_onnx(qmodel, args.out, example=example, format=args.format, opset=args.opset)
    print(f"{args.model}: {len(qmodel.plan)} quantized layers ({args.preset}) exported as {args.format} to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``segquant-fx``."""
    parser = argparse.ArgumentParser(prog="segquant-fx", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print the SegQuant pattern report of a model")
    p.add_argument("--model", help="built-in name (see --list) or path/to/file.py:factory")
    p.add_argument("--list", action="store_true", help="list the built-in models")
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    p.add_argument("--debug", action="store_true", help="also print rejected candidates and why")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--patterns", help="comma-separated pattern names (default: all registered)")
    p.add_argument("--static", action="store_true", help="capture with static shapes")
    p.set_defaults(func=_cmd_inspect)

    q = sub.add_parser("quantize", help="quantize a model and report per-layer plan and output error")
    q.add_argument("--model", default="tiny-sd35", help="built-in name (default tiny-sd35) or path/to/file.py:factory")
    q.add_argument("--preset", default="w8a8", help="config preset (w8a8, w8a8-fp8, w8a8-dynamic, w8a16, w4a16)")
    q.add_argument("--calib-items", type=int, default=8, help="calibration items (random inputs for built-ins)")
    q.add_argument("--batch-size", type=int, default=2)
    q.add_argument("--out", help="save the quantized model to this directory")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_cmd_quantize)
    from segquant_fx import workflow_cli  # calibrate / generate, and quantize's pipeline mode

    workflow_cli.extend_quantize(q, _cmd_quantize)
    workflow_cli.add_commands(sub)

    from segquant_fx.ops.build import add_arguments

    b = sub.add_parser("build-kernels", help="compile the CUDA kernel library (kernels_cuda/) with nvcc")
    add_arguments(b)
    b.set_defaults(func=_cmd_build_kernels)

    e = sub.add_parser("export-onnx", help="quantize a model and export it to ONNX (qdq or segquant ops)")
    e.add_argument("--model", default="tiny-sd35", help="built-in name (default tiny-sd35) or path/to/file.py:factory")
    e.add_argument("--preset", default="w8a8", help="config preset (w8a8, w8a8-fp8, w8a8-dynamic, w8a16, w4a16)")
    e.add_argument("--format", default="qdq", choices=["qdq", "segquant"], help="standard QDQ ops or com.segquant ops")
    e.add_argument("--out", required=True, help="output .onnx file")
    e.add_argument("--opset", type=int, default=21, help="ONNX opset (default 21)")
    e.add_argument("--calib-items", type=int, default=8, help="calibration items (random inputs for built-ins)")
    e.add_argument("--batch-size", type=int, default=2)
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=_cmd_export_onnx)

    from segquant_fx.datasets.cli import add_dataset_parser

    add_dataset_parser(sub)
    from segquant_fx.t2i.demo import add_demo_parser  # demo: built-in t2i model, float vs quantized

    add_demo_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``segquant-fx`` script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SegQuantError as e:
        print(f"segquant-fx {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
