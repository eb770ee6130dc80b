"""The pattern registry: user patterns by name, errors, and debug output of rejected candidates."""

from __future__ import annotations

import dataclasses
import inspect
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segquant_fx import find_patterns
from segquant_fx.errors import PatternError
from segquant_fx.graph import GraphView
from segquant_fx.patterns import (
    BUILTIN_PATTERNS,
    PATTERNS,
    Pattern,
    PlanContribution,
    Rejection,
    find_matches,
    get_pattern,
    register_pattern,
    unregister_pattern,
)
from segquant_fx.patterns.matcher import DEBUG_ENV, _compile

from ._toys import LinearThen, captured, host_targets, matches_of, report_of

NAME = "linear_to_mul_gate"


@pytest.fixture(autouse=True)
def _restore_registry():
    """Every test leaves PATTERNS exactly as it found it (order included) and the compile cache clean."""
    saved = dict(PATTERNS)
    yield
    PATTERNS.clear()
    PATTERNS.update(saved)
    _compile.cache_clear()


# ------------------------------------------------------------------------------- a user pattern


def make_mul_gate_pattern(segments: tuple[int, ...] | None = None) -> Pattern:
    """A complete user pattern: a linear whose output is gated by a sigmoid."""

    def _mul_gate_pattern(x, w, g):
        return F.linear(x, w) * torch.sigmoid(g)

    def check(m, view):  # the gate must be per feature, not a broadcast scalar
        gate, out = (view.graph.nodes[n]["shape"][-1] for n in (m.node("aten.sigmoid"), m.anchor))
        return None if gate == out else f"gate width {gate} != linear width {out}"

    def plan(m, view):
        return PlanContribution(
            output_segments=segments, detail={"gate": view.target(m.node("aten.sigmoid"))}
        )

    return Pattern(
        name=NAME,
        search=(_mul_gate_pattern,),
        example_inputs=lambda: (torch.randn(2, 4), torch.randn(4, 4), torch.randn(2, 4)),
        check=check,
        plan=plan,
        only_consumer=frozenset({"aten.linear.default"}),
        description="linear output multiplied by a sigmoid gate",
    )


class _Gated(nn.Module):
    """``lin(x) * sigmoid(g)``, optionally also returning the ungated output."""

    def __init__(self, leak: bool = False):
        super().__init__()
        self.lin = nn.Linear(8, 4)
        self.leak = leak

    def forward(self, x: torch.Tensor, g: torch.Tensor):
        y = self.lin(x)
        return (y * torch.sigmoid(g), y) if self.leak else y * torch.sigmoid(g)


def _gated_example(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(b, 5, 8), torch.randn(b, 5, 4)


def test_user_pattern_fits_in_30_lines():
    assert len(inspect.getsource(make_mul_gate_pattern).splitlines()) < 30


def test_registered_user_pattern_is_found_by_name():
    torch.manual_seed(0)
    p = register_pattern(make_mul_gate_pattern())
    assert get_pattern(NAME) is p
    assert list(PATTERNS)[-1] == NAME

    cm = captured(_Gated(), _gated_example)
    view, found, rejections = matches_of(cm, NAME)
    assert rejections == []
    assert len(found) == 1
    (m,) = found
    assert host_targets(view, m) == {"aten.linear.default", "aten.mul.Tensor", "aten.sigmoid.default"}
    assert m.contribution.detail == {"gate": "aten.sigmoid.default"}

    report = find_patterns(cm, patterns=[NAME], debug=True)
    assert report.counts == {NAME: 1}
    assert set(report.layers) == {"lin"}
    assert report.layers["lin"].patterns == (NAME,)

    # and with the default selection (every registered pattern), next to the built-ins
    everything = report_of(cm)
    assert set(everything.counts) == {*BUILTIN_PATTERNS, NAME}
    assert everything.counts[NAME] == 1
    assert everything.layers["lin"].patterns == (NAME,)


def test_user_pattern_only_consumer_rejects_a_leaking_linear():
    """``lin(x)`` is gated *and* returned: the user's only-consumer constraint rejects it."""
    torch.manual_seed(0)
    register_pattern(make_mul_gate_pattern())
    cm = captured(_Gated(leak=True), _gated_example)
    report = find_patterns(cm, patterns=[NAME], debug=True)
    assert report.counts == {NAME: 0}
    assert [str(r) for r in report.rejections] == [
        f"{NAME}: rejected linear (lin): linear is also used outside the pattern by output (output)"
    ]


def test_duplicate_name_is_an_error():
    """Registering a second pattern under a taken name fails and names the pattern."""
    register_pattern(make_mul_gate_pattern())
    with pytest.raises(PatternError, match=f"a pattern named '{NAME}' is already registered.*replace=True"):
        register_pattern(make_mul_gate_pattern())


def test_builtin_name_is_taken_too():
    """A user pattern cannot silently shadow a built-in."""
    clash = dataclasses.replace(make_mul_gate_pattern(), name="linear_to_chunk")
    with pytest.raises(PatternError, match="'linear_to_chunk' is already registered"):
        register_pattern(clash)
    assert get_pattern("linear_to_chunk").priority == 10


def test_replace_true_swaps_the_pattern():
    torch.manual_seed(0)
    first = register_pattern(make_mul_gate_pattern())
    cm = captured(_Gated(), _gated_example)
    assert find_patterns(cm, patterns=[NAME]).layers["lin"].output_segments is None

    second = register_pattern(make_mul_gate_pattern(segments=(1, 3)), replace=True)
    assert second is not first
    assert get_pattern(NAME) is second
    report = find_patterns(cm, patterns=[NAME])
    assert report.counts == {NAME: 1}
    assert report.layers["lin"].output_segments == (1, 3)


def test_unregister_removes_the_pattern():
    register_pattern(make_mul_gate_pattern())
    unregister_pattern(NAME)
    assert NAME not in PATTERNS
    unregister_pattern(NAME)  # absent: no error
    with pytest.raises(PatternError, match=f"unknown pattern '{NAME}'"):
        get_pattern(NAME)


def test_unknown_pattern_name_in_find_patterns_is_an_error():
    """A typo in ``patterns=[...]`` fails before matching, naming the unknown pattern and the known ones."""
    torch.manual_seed(0)
    model = LinearThen(lambda y: y.chunk(2, -1))
    with pytest.raises(
        PatternError, match=r"unknown pattern 'linear_to_chunkk'; registered: linear_to_chunk, "
    ):
        find_patterns(model, (torch.randn(2, 8),), patterns=["linear_to_chunk", "linear_to_chunkk"])


def test_search_without_a_linear_anchor_is_an_error():
    """A search function with no ``aten.linear`` node has no anchor: PatternError when it is compiled."""
    torch.manual_seed(0)

    def _no_linear(x):
        return torch.sigmoid(x) * x

    register_pattern(
        dataclasses.replace(
            make_mul_gate_pattern(),
            name="no_anchor",
            search=(_no_linear,),
            example_inputs=lambda: (torch.randn(2, 4),),
        )
    )
    model = LinearThen(lambda y: y.chunk(2, -1))
    with pytest.raises(
        PatternError,
        match=r"'no_anchor': search function #0 must contain exactly one "
        r"aten.linear.default node \(the anchor\), found 0",
    ):
        find_patterns(model, (torch.randn(2, 8),), patterns=["no_anchor"])


def test_search_with_two_linear_anchors_is_an_error():
    """Two linears in one search function: which one the plan is about is ambiguous."""

    def _two_linears(x, w):
        return F.linear(F.linear(x, w), w)

    bad = dataclasses.replace(
        make_mul_gate_pattern(),
        name="two_anchors",
        search=(_two_linears,),
        example_inputs=lambda: (torch.randn(2, 4), torch.randn(4, 4)),
    )
    cm = captured(LinearThen(lambda y: y), lambda b: (torch.randn(b, 8),))
    with pytest.raises(PatternError, match="found 2"):
        find_matches(cm.graph_module, bad)


def test_untraceable_search_function_is_an_error():
    """A search function that fails on its example inputs is reported with the pattern's name."""

    def _broken(x, w):
        return F.linear(x, w[:, :3])  # in_features 3 != 4

    bad = dataclasses.replace(
        make_mul_gate_pattern(),
        name="broken",
        search=(_broken,),
        example_inputs=lambda: (torch.randn(2, 4), torch.randn(4, 4)),
    )
    cm = captured(LinearThen(lambda y: y), lambda b: (torch.randn(b, 8),))
    with pytest.raises(
        PatternError, match=r"pattern 'broken': search function #0 \(_broken\) could not be traced"
    ):
        find_matches(cm.graph_module, bad)


def test_plan_returning_the_wrong_type_is_an_error():
    """``plan`` must return a PlanContribution."""
    torch.manual_seed(0)
    bad = dataclasses.replace(make_mul_gate_pattern(), plan=lambda m, v: {"output_segments": (2, 2)})
    cm = captured(_Gated(), _gated_example)
    with pytest.raises(PatternError, match="plan\\(\\) returned dict, expected PlanContribution"):
        find_matches(cm.graph_module, bad)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        pytest.param(
            lambda: "linear_to_chunk", "register_pattern\\(\\) takes a Pattern, got str", id="not-a-pattern"
        ),
        pytest.param(
            lambda: dataclasses.replace(make_mul_gate_pattern(), name=""), "non-empty string", id="empty-name"
        ),
        pytest.param(
            lambda: dataclasses.replace(make_mul_gate_pattern(), search=()), "has no search", id="no-search"
        ),
    ],
)
def test_malformed_registration_is_an_error(bad, message):
    """Malformed patterns are refused at registration, with what is wrong."""
    with pytest.raises(PatternError, match=message):
        register_pattern(bad())
    assert NAME not in PATTERNS


# ------------------------------------------------------------------------------------------ debug


_LEAK_REJECTION = (
    "linear_to_chunk: rejected linear (lin): linear is also used outside the pattern by output (output)"
)


def _leaky_chunk_model():
    return LinearThen(lambda y: (*y.chunk(3, -1), y))


def test_debug_rejections_are_readable():
    torch.manual_seed(0)
    report = find_patterns(_leaky_chunk_model(), (torch.randn(2, 5, 8),), debug=True)
    assert report.counts["linear_to_chunk"] == 0
    assert len(report.rejections) == 1
    (r,) = report.rejections
    assert isinstance(r, Rejection)
    assert (r.pattern, r.anchor, r.anchor_module) == ("linear_to_chunk", "linear", "lin")
    assert callable(r.reason)  # formatted only when read
    assert r.message == "linear is also used outside the pattern by output (output)"
    assert str(r) == _LEAK_REJECTION
    assert report.to_dict()["rejections"] == [str(r)]

    quiet = find_patterns(_leaky_chunk_model(), (torch.randn(2, 5, 8),))
    assert quiet.rejections == []


def test_debug_env_logs_rejections(monkeypatch, caplog):
    torch.manual_seed(0)
    monkeypatch.setenv(DEBUG_ENV, "1")
    caplog.set_level(logging.DEBUG, logger="segquant_fx.patterns.matcher")
    find_patterns(_leaky_chunk_model(), (torch.randn(2, 5, 8),))
    records = [r for r in caplog.records if r.name == "segquant_fx.patterns.matcher"]
    assert [(r.levelno, r.getMessage()) for r in records] == [(logging.DEBUG, _LEAK_REJECTION)]


def test_no_debug_logging_without_the_env(monkeypatch, caplog):
    """Without SEGQUANT_DEBUG_PATTERNS=1 nothing is logged, even at DEBUG level."""
    torch.manual_seed(0)
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    caplog.set_level(logging.DEBUG, logger="segquant_fx.patterns.matcher")
    find_patterns(_leaky_chunk_model(), (torch.randn(2, 5, 8),))
    assert [r for r in caplog.records if r.name == "segquant_fx.patterns.matcher"] == []


# ------------------------------------------------------------------------------- compile caching


def test_patterns_differing_only_in_search_are_compiled_separately():
    torch.manual_seed(0)

    def _chunk(x, w):
        return F.linear(x, w).chunk(2, -1)

    def _split(x, w):
        return F.linear(x, w).split(2, -1)

    example = lambda: (torch.randn(2, 4), torch.randn(4, 4))  # noqa: E731
    base = make_mul_gate_pattern()
    plain = {"check": lambda m, v: None, "plan": lambda m, v: PlanContribution(), "example_inputs": example}
    by_chunk = dataclasses.replace(base, name="user_split", search=(_chunk,), **plain)
    by_split = dataclasses.replace(base, name="user_split", search=(_split,), **plain)
    cm = captured(LinearThen(lambda y: y.split(6, -1)), lambda b: (torch.randn(b, 8),))
    view = GraphView(cm.graph_module)
    assert find_matches(view, by_chunk) == []
    assert len(find_matches(view, by_split)) == 1
