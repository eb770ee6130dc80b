"""``python3 -m segquant_fx.t2i install FILE.tar [...]``: install trained text-to-image weights into the package."""

from __future__ import annotations

import argparse
import sys

from segquant_fx.errors import SegQuantError

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python3 -m segquant_fx.t2i", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    inst = sub.add_parser(
        "install", help="install t2i-<name>.tar files from benchmarks/train_t2i.py --pack tar"
    )
    inst.add_argument("tars", nargs="+")
    inst.add_argument("--weights-root", default=None, help="install here instead of segquant_fx/t2i/weights")
    args = p.parse_args(argv)
    from segquant_fx.t2i.install import install_weights

    try:
        for t in args.tars:
            print(f"installed {t} -> {install_weights(t, args.weights_root)}")
    except SegQuantError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
