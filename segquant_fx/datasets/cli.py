"""``segquant-fx dataset prepare``: the command line of :func:`segquant_fx.datasets.prepare.prepare_dataset`.

Registered in :mod:`segquant_fx.cli` by :func:`add_dataset_parser`. One command per dataset::

    segquant-fx dataset prepare --dataset coco --src /data/coco --out coco-canny --sample-size 5000
    segquant-fx dataset prepare --dataset mjhq --src /data/MJHQ-30K --out mjhq-canny --sample-size 500 --per-category
    segquant-fx dataset prepare --dataset dci --src /data/densely_captioned_images --out dci-canny --sample-size 5000
"""

from __future__ import annotations

import argparse
from typing import Any

from segquant_fx.errors import ConfigError

__all__ = ["add_dataset_parser", "run_dataset"]


def add_dataset_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``dataset`` command (with its ``prepare`` subcommand) to ``segquant-fx``'s subparsers."""
    d = sub.add_parser(
        "dataset", help="prepare prompt/image/control-map datasets from local COCO, MJHQ-30K, DCI"
    )
    dsub = d.add_subparsers(dest="dataset_command", required=True)
    p = dsub.add_parser(
        "prepare",
        help="sample a local dataset copy and write metadata.json + images + control maps",
        description="Sample a local copy of COCO-2017 captions, MJHQ-30K or DCI deterministically, copy the "
        "images, make control maps, and write the unified format (metadata.json). The output directory "
        "appears when complete; rerunning an interrupted command continues it.",
    )
    p.add_argument("--dataset", required=True, choices=["coco", "mjhq", "dci"], help="source dataset")
    p.add_argument(
        "--src",
        required=True,
        help="local copy: COCO root (annotations/, val2017/); MJHQ dir (meta_data.json + category folders); "
        "DCI densely_captioned_images/ (annotations/, photos/)",
    )
    p.add_argument("--out", required=True, help="output directory (created; must not hold another dataset)")
    p.add_argument(
        "--control", default="canny", help="control map: canny (default), depth, none, or a registered name"
    )
    p.add_argument(
        "--sample-size",
        type=int,
        default=None,
        help="items to keep (per category with --per-category); default all",
    )
    p.add_argument(
        "--per-category", action="store_true", help="take --sample-size items from every category (mjhq)"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument(
        "--blur",
        type=int,
        default=None,
        metavar="K",
        help="Gaussian blur KxK (odd) before Canny (SegQuant: 3)",
    )
    p.add_argument("--canny-low", type=float, default=100, help="Canny lower threshold (default 100)")
    p.add_argument("--canny-high", type=float, default=200, help="Canny upper threshold (default 200)")
    p.add_argument("--split", default="val2017", help="coco: split (default val2017)")
    p.add_argument(
        "--captions-per-prompt", type=int, default=5, help="coco: captions joined into a prompt (0: all)"
    )
    p.add_argument("--categories", help="mjhq: comma-separated categories to keep (default all)")
    p.add_argument(
        "--depth-model",
        help="depth: path/to/file.py:factory; factory() returns a callable PIL image -> depth array (local weights)",
    )
    p.add_argument("--workers", type=int, default=None, help="threads (default: CPUs, at most 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_dataset)
    return d


def _depth_maker(spec: str | None) -> Any:
    from pathlib import Path

    from segquant_fx.datasets.control import DepthControl

    if not spec or ":" not in spec:
        raise ConfigError(
            "--control depth needs --depth-model path/to/file.py:factory (the factory returns the model)"
        )
    path_s, name = spec.rsplit(":", 1)
    path = Path(path_s)
    if not path.is_file():
        raise ConfigError(f"--depth-model {spec!r}: file {path} does not exist")
    import importlib.util

    mod_spec = importlib.util.spec_from_file_location(f"_segquant_depth_{path.stem}", path)
    module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
    mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ConfigError(f"--depth-model {spec!r}: {path} has no callable {name!r}")
    return DepthControl(factory(), model_id=f"{path.name}:{name}")


def run_dataset(args: argparse.Namespace) -> int:
    """Run ``segquant-fx dataset prepare`` from parsed arguments; returns the exit code."""
    from segquant_fx.datasets.prepare import prepare_dataset

    control: Any = args.control
    control_options: dict[str, Any] = {}
    canny_flags = args.blur is not None or args.canny_low != 100 or args.canny_high != 200
    if control == "canny":
        control_options = {"low": args.canny_low, "high": args.canny_high, "blur": args.blur or None}
    elif canny_flags:
        raise ConfigError(f"--blur/--canny-low/--canny-high apply to --control canny, not {control!r}")
    if control == "none":
        control = None
    elif control == "depth":
        control = _depth_maker(args.depth_model)
    source_options: dict[str, Any] = {}
    if args.dataset == "coco":
        source_options = {"split": args.split, "captions_per_prompt": args.captions_per_prompt or None}
    elif args.split != "val2017" or args.captions_per_prompt != 5:
        raise ConfigError(f"--split/--captions-per-prompt apply to --dataset coco, not {args.dataset!r}")
    if args.categories:
        if args.dataset != "mjhq":
            raise ConfigError(f"--categories applies to --dataset mjhq, not {args.dataset!r}")
        source_options["categories"] = [c.strip() for c in args.categories.split(",") if c.strip()]
    prepare_dataset(
        args.dataset,
        args.src,
        args.out,
        control=control,
        control_options=control_options,
        sample_size=args.sample_size,
        per_category=args.per_category,
        seed=args.seed,
        source_options=source_options,
        workers=args.workers,
        progress=not args.quiet,
    )
    return 0
