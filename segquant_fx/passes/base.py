"""Pass infrastructure: ``SegQuantPass`` (a ``PassBase``) and ``run_passes`` (a ``PassManager``).

Every pass is in place, reports ``modified`` honestly, and is run through ``torch.fx``'s
``PassManager`` with ``gm.graph.lint()`` after each pass and a recompile. A failing pass is re-raised
as :class:`~segquant_fx.errors.PassError` naming the pass and the passes that ran before it.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.infra.pass_manager import PassManager

from segquant_fx.errors import PassError, SegQuantError

__all__ = ["SegQuantPass", "PassResult", "run_passes", "SEGQUANT_ANNOTATION_KEY"]

#: ``node.meta`` key holding a node's frozen annotation (written by the annotate pass only).
SEGQUANT_ANNOTATION_KEY = "segquant_annotation"


class SegQuantPass(PassBase):
    """Base class of segquant_fx passes: parameters in ``__init__``, work in ``call(gm)``."""

    @property
    def name(self) -> str:
        """The pass's name, for messages."""
        return type(self).__name__

    def requires(self, graph_module: fx.GraphModule) -> None:
        """Check preconditions (default: none)."""

    def ensures(self, graph_module: fx.GraphModule) -> None:
        """Check postconditions (default: the graph lints)."""
        graph_module.graph.lint()


def _lint(gm: fx.GraphModule) -> None:
    gm.graph.lint()


def run_passes(gm: fx.GraphModule, passes: Sequence[SegQuantPass]) -> fx.GraphModule:
    """Run ``passes`` in order on ``gm`` (in place), linting and recompiling after each.

    Raises:
        PassError: Naming the failing pass and the ones before it; the original error is chained.
        SegQuantError: Our own errors raised inside a pass are re-raised unchanged (they already say
            what to do).
    """
    done: list[str] = []
    for p in passes:
        pm = PassManager(passes=[p], run_checks_after_each_pass=True)
        pm.add_checks(_lint)
        try:
            result = pm(gm)
        except SegQuantError:
            raise
        except Exception as e:
            root = e.__cause__ or e  # PassManager wraps the pass's own error
            if isinstance(root, SegQuantError):
                raise root from e
            before = ", ".join(done) or "none"
            raise PassError(
                f"pass {p.name} failed (passes run before it: {before}): {type(root).__name__}: {root}"
            ) from root
        gm = result.graph_module
        gm.recompile()
        done.append(p.name)
    return gm
