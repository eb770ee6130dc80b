"""Tests of segquant_fx.config: dict/JSON/YAML round trips, glob overrides, presets, errors."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from segquant_fx.config import (
    BUILTIN_PATTERNS,
    CONFIG_VERSION,
    DEFAULT_PRESET,
    DUAL_SCALE_PATTERN,
    OP_QTYPES,
    PRESETS,
    QUANT_TYPES,
    SEGMENTATION_PATTERNS,
    W4A4,
    W4A8,
    W4A16,
    W8A8,
    W8A8_DYNAMIC,
    W8A8_FP8,
    W8A16,
    CalibConfig,
    FrozenDict,
    LayerConfig,
    OptConfig,
    QuantizeConfig,
    QuantSpec,
    SearchAlphaConfig,
    canonical_quant_type,
    check_supported,
    get_preset,
    op_qtype,
    validate_pattern_names,
)
from segquant_fx.errors import ConfigError

yaml = pytest.importorskip("yaml")

HYPOTHESIS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])


def _m(text: str) -> str:
    """Regex matching ``text`` literally."""
    return re.escape(text)


# ----------------------------------------------------------------------------------------- presets

EXPECTED_PRESETS = {"w8a8", "w8a8-fp8", "w8a8-dynamic", "w4a8", "w4a4", "w4a16", "w8a16"}


def test_preset_names_and_constants():
    assert set(PRESETS) == EXPECTED_PRESETS
    assert DEFAULT_PRESET == "w8a8"
    constants = {
        "w8a8": W8A8,
        "w8a8-fp8": W8A8_FP8,
        "w8a8-dynamic": W8A8_DYNAMIC,
        "w4a8": W4A8,
        "w4a4": W4A4,
        "w4a16": W4A16,
        "w8a16": W8A16,
    }
    for name, cfg in constants.items():
        assert PRESETS[name] is cfg
        assert get_preset(name) is cfg
    assert len(set(PRESETS.values())) == len(PRESETS), "presets must differ (and be hashable)"


def test_presets_are_read_only():
    with pytest.raises(TypeError):
        PRESETS["mine"] = W8A8  # type: ignore[index]


# name: (input type, input granularity, weight type, weight granularity, group, opt, low_rank, calib)
PRESET_TABLE = {
    "w8a8": ("int8", "per_tensor", "int8", "per_channel", None, "smooth", None, "amax"),
    "w8a8-fp8": ("fpe4m3", "per_tensor", "fpe4m3", "per_channel", None, "default", None, "amax"),
    "w8a8-dynamic": ("int8", "per_token", "int8", "per_channel", None, "smooth", None, "amax"),
    "w4a8": ("int8", "per_token", "int4", "per_channel", None, "svd", 32, "gptq"),
    "w4a4": ("int4", "per_token", "int4", "per_channel", None, "svd", 32, "gptq"),
    "w4a16": ("fp16", "none", "int4", "per_group", 64, "default", None, "amax"),
    "w8a16": ("fp16", "none", "int8", "per_channel", None, "default", None, "amax"),
}


@pytest.mark.parametrize("name", sorted(PRESET_TABLE))
def test_preset_contents(name):
    in_type, in_gran, w_type, w_gran, group, opt, low_rank, calib = PRESET_TABLE[name]
    layer = PRESETS[name].default
    assert PRESETS[name].overrides == ()
    assert (layer.input_quant.type, layer.input_quant.granularity) == (in_type, in_gran)
    assert (layer.weight_quant.type, layer.weight_quant.granularity) == (w_type, w_gran)
    assert layer.weight_quant.group_size == group
    assert layer.weight_quant.axis == 0
    assert (layer.opt.type, layer.opt.low_rank, layer.calib.type) == (opt, low_rank, calib)
    if in_gran == "per_token":
        assert layer.input_quant.dynamic
        assert layer.input_quant.axis == -1
    flags = (layer.enable, layer.seglinear, layer.dual_scale, layer.real_quant)
    assert flags == (True, True, True, True)
    assert layer.search_patterns == BUILTIN_PATTERNS
    assert layer.weight_only == (in_type == "fp16")


def test_w8a8_alpha_and_default_preset():
    assert W8A8.default.opt.alpha == 0.5
    assert QuantizeConfig.coerce(None) is W8A8


def test_w8a8_to_dict_is_the_seed_format():
    assert W8A8.to_dict() == {
        "default": {
            "enable": True,
            "seglinear": True,
            "search_patterns": list(BUILTIN_PATTERNS),
            "real_quant": True,
            "dual_scale": True,
            "opt": {
                "type": "smooth",
                "alpha": 0.5,
                "search_alpha_config": {"enable": False, "min": 0.0, "max": 1.0, "step": 0.1},
            },
            "calib": {"type": "amax"},
            "input_quant": {
                "type": "int8",
                "axis": None,
                "dynamic": False,
                "symmetric": True,
                "group_size": None,
            },
            "weight_quant": {
                "type": "int8",
                "axis": 0,
                "dynamic": False,
                "symmetric": True,
                "group_size": None,
            },
        }
    }


def test_builtin_patterns():
    assert BUILTIN_PATTERNS == (
        "linear_to_chunk",
        "linear_to_split",
        "concat_to_linear",
        "stack_to_linear",
        "reshape_to_linear",
        "activation_to_linear",
    )
    assert DUAL_SCALE_PATTERN not in SEGMENTATION_PATTERNS


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_preset_round_trips(name):
    cfg = PRESETS[name]
    assert QuantizeConfig.from_dict(cfg.to_dict()) == cfg
    assert QuantizeConfig.from_json(cfg.to_json()) == cfg
    assert QuantizeConfig.from_yaml(cfg.to_yaml()) == cfg
    assert hash(QuantizeConfig.from_dict(cfg.to_dict())) == hash(cfg)
    assert json.loads(cfg.to_json()) == {"version": CONFIG_VERSION, **cfg.to_dict()}
    assert yaml.safe_load(cfg.to_yaml()) == cfg.to_dict(include_version=True)


@pytest.mark.parametrize(
    ("alias", "expected"), [("W8A8_FP8", "w8a8-fp8"), (" w4a16 ", "w4a16"), ("W8A8", "w8a8")]
)
def test_get_preset_normalizes_spelling(alias, expected):
    assert get_preset(alias) is PRESETS[expected]


@pytest.mark.parametrize("bad", ["w9a9", "", "w8a8-fp16"])
def test_get_preset_unknown_lists_valid_names(bad):
    with pytest.raises(ConfigError, match=_m(repr(bad))) as info:
        get_preset(bad)
    for name in EXPECTED_PRESETS:
        assert repr(name) in str(info.value)


# ------------------------------------------------------------------------------------------ coerce


def test_coerce_accepts_every_spelling():
    assert QuantizeConfig.coerce(W4A8) is W4A8
    assert QuantizeConfig.coerce("w4a8") is W4A8
    assert QuantizeConfig.coerce("W4A4") is W4A4
    assert QuantizeConfig.coerce(W8A16.to_dict()) == W8A16
    layer = LayerConfig(opt=OptConfig(type="default"))
    assert QuantizeConfig.coerce(layer) == QuantizeConfig(default=layer)


def test_coerce_dict_uses_known_patterns():
    data = {"default": {"search_patterns": ["my_pattern"]}}
    with pytest.raises(ConfigError, match=_m("default.search_patterns = 'my_pattern'")):
        QuantizeConfig.coerce(data)
    cfg = QuantizeConfig.coerce(data, known_patterns=["my_pattern"])
    assert cfg.default.search_patterns == ("my_pattern",)


@pytest.mark.parametrize("bad", [3, 1.5, ["w8a8"], b"w8a8"])
def test_coerce_rejects_other_types(bad):
    with pytest.raises(ConfigError, match=r"cannot use a \w+ as a quantization config.*'w8a8'"):
        QuantizeConfig.coerce(bad)


def test_coerce_unknown_preset():
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'; valid presets: .*'w4a4'"):
        QuantizeConfig.coerce("nope")


# ---------------------------------------------------------------------------- seed dicts, aliases


def test_reference_style_dict_loads():
    data = {
        "default": {
            "enable": True,
            "seglinear": True,
            "search_patterns": list(BUILTIN_PATTERNS),
            "real_quant": False,
            "opt": {"type": "smooth", "alpha": 0.5, "search_alpha_config": {"enable": True, "step": 0.25}},
            "calib": {"type": "amax"},
            "input_quant": {"type": "int8", "axis": None},
            "weight_quant": {"type": "int8", "axis": 1},
        },
        "*proj_out*": {"enable": False},
    }
    cfg = QuantizeConfig.from_dict(data)
    assert cfg.default.weight_quant.axis == 0, "the reference's weight axis 1 means per-output-channel"
    assert cfg.default.weight_quant.granularity == "per_channel"
    assert cfg.default.opt.search_alpha_config == SearchAlphaConfig(enable=True, step=0.25)
    assert cfg.default.dual_scale is True
    assert cfg.overrides == (("*proj_out*", FrozenDict({"enable": False})),)
    assert cfg.layer_config("transformer_blocks.0.proj_out").enable is False
    assert cfg.layer_config("transformer_blocks.0.proj_in").enable is True


def test_missing_default_keys_take_field_defaults():
    assert QuantizeConfig.from_dict({"default": {}}) == QuantizeConfig()
    assert QuantizeConfig().default == LayerConfig()
    assert LayerConfig().opt == OptConfig(type="smooth", alpha=0.5)


@pytest.mark.parametrize("alias", ["fp8", "fp8_e4m3", "e4m3", "FP8", "FPE4M3", "E4M3"])
def test_type_aliases_normalize(alias):
    cfg = QuantizeConfig.from_dict(
        {
            "default": {"input_quant": {"type": alias}, "weight_quant": {"type": alias, "axis": 1}},
            "*x*": {"input_quant": {"type": alias}},
        }
    )
    assert cfg.default.input_quant.type == cfg.default.weight_quant.type == "fpe4m3"
    assert cfg.overrides[0][1]["input_quant"]["type"] == "fpe4m3"
    assert canonical_quant_type(alias) == "fpe4m3"
    assert op_qtype(alias) == "fp8_e4m3"


def test_case_of_section_types_is_normalized():
    cfg = QuantizeConfig.from_dict({"default": {"opt": {"type": "SMOOTH"}, "calib": {"type": "AMax"}}})
    assert (cfg.default.opt.type, cfg.default.calib.type) == ("smooth", "amax")


def test_op_qtypes():
    assert dict(OP_QTYPES) == {
        "int8": "int8",
        "int4": "int4",
        "fpe4m3": "fp8_e4m3",
        "fp16": None,
        "bf16": None,
    }
    assert set(OP_QTYPES) == set(QUANT_TYPES)
    assert QuantSpec(type="int4").op_qtype == "int4"
    assert QuantSpec(type="bf16").op_qtype is None
    with pytest.raises(ConfigError, match=_m("type = 'int3': unknown quantization type")):
        op_qtype("int3")


def test_granularity():
    assert QuantSpec().granularity == "per_tensor"
    assert QuantSpec(axis=-1, dynamic=True).granularity == "per_token"
    assert QuantSpec(dynamic=True).granularity == "per_token", "dynamic implies per-token"
    assert QuantSpec(axis=0).granularity == "per_channel"
    assert QuantSpec(axis=0, group_size=128).granularity == "per_group"
    assert QuantSpec(type="fp16").granularity == "none"


def test_dynamic_activation_without_axis_is_accepted():
    cfg = QuantizeConfig.from_dict({"default": {"input_quant": {"type": "int8", "dynamic": True}}})
    assert cfg.default.input_quant.granularity == "per_token"


def test_fp16_input_accepts_null_axis_in_seed_dicts():
    cfg = QuantizeConfig.from_dict(
        {"default": {"input_quant": {"type": "fp16", "axis": None}, "weight_quant": {"axis": 1}}}
    )
    assert cfg.default.weight_only
    assert cfg.default.input_quant.to_dict() == {"type": "fp16"}


def test_dual_scale_on_weight_only_is_allowed_but_inactive():
    layer = W8A16.default
    assert layer.dual_scale
    assert not layer.uses_dual_scale
    assert W8A8.default.uses_dual_scale


# ---------------------------------------------------------------------------------- glob overrides


def test_partial_override_keeps_other_default_keys():
    cfg = W8A8.with_overrides({"*ff.net.2": {"input_quant": {"type": "int4"}, "opt": {"alpha": 0.8}}})
    layer = cfg.layer_config("transformer_blocks.3.ff.net.2")
    expected = dataclasses.replace(
        W8A8.default,
        input_quant=QuantSpec(type="int4"),
        opt=dataclasses.replace(W8A8.default.opt, alpha=0.8),
    )
    assert layer == expected
    assert cfg.layer_config("transformer_blocks.3.attn.to_q") is cfg.default


def test_nested_search_alpha_config_is_deep_merged():
    base = W8A8.with_overrides({"default": {"opt": {"search_alpha_config": {"min": 0.2, "max": 0.6}}}})
    cfg = base.with_overrides({"*norm1*": {"opt": {"search_alpha_config": {"enable": True}}}})
    sac = cfg.layer_config("blocks.0.norm1.linear").opt.search_alpha_config
    assert sac == SearchAlphaConfig(enable=True, min=0.2, max=0.6, step=0.1)


def test_later_globs_override_earlier_ones():
    data = {"default": {}, "*attn*": {"opt": {"alpha": 0.2}}, "*to_q": {"opt": {"alpha": 0.9}}}
    cfg = QuantizeConfig.from_dict(data)
    assert cfg.layer_config("blocks.0.attn.to_q").opt.alpha == 0.9
    assert cfg.layer_config("blocks.0.attn.to_k").opt.alpha == 0.2
    assert cfg.matching_globs("blocks.0.attn.to_q") == ("*attn*", "*to_q")
    reversed_cfg = QuantizeConfig.from_dict({"default": {}, "*to_q": data["*to_q"], "*attn*": data["*attn*"]})
    assert reversed_cfg.layer_config("blocks.0.attn.to_q").opt.alpha == 0.2
    assert reversed_cfg != cfg, "glob order is part of the config"


def test_glob_order_survives_serialization():
    globs = ["*z*", "*a*", "*m*"]
    cfg = QuantizeConfig.from_dict({"default": {}, **{g: {"opt": {"alpha": 0.1}} for g in globs}})
    assert [g for g, _ in QuantizeConfig.from_yaml(cfg.to_yaml()).overrides] == globs
    assert [g for g, _ in QuantizeConfig.from_json(cfg.to_json()).overrides] == globs
    assert list(cfg.to_dict())[1:] == globs


def test_type_change_drops_options_of_the_old_type():
    cfg = W4A8.with_overrides({"*proj*": {"opt": {"type": "smooth"}, "calib": {"type": "amax"}}})
    layer = cfg.layer_config("proj_out")
    assert layer.opt == OptConfig(type="smooth", alpha=0.5)
    assert layer.calib == CalibConfig(type="amax")
    dyn = W8A8_DYNAMIC.with_overrides({"*proj*": {"input_quant": {"type": "bf16"}}})
    assert dyn.layer_config("proj_out").input_quant == QuantSpec(type="bf16")


def test_type_change_keeps_options_that_still_apply():
    cfg = W4A8.with_overrides({"*proj*": {"weight_quant": {"type": "int8"}}})
    assert cfg.layer_config("proj_out").weight_quant == QuantSpec(type="int8", axis=0)


def test_switching_to_svd_in_a_glob_needs_low_rank():
    with pytest.raises(ConfigError, match=_m('"*proj*".opt.low_rank = None')):
        W8A8.with_overrides({"*proj*": {"opt": {"type": "svd"}}})
    cfg = W8A8.with_overrides({"*proj*": {"opt": {"type": "svd", "low_rank": 16}}})
    assert cfg.layer_config("proj_out").opt == OptConfig(type="svd", low_rank=16)


def test_globs_are_case_sensitive_fnmatch():
    cfg = W8A8.with_overrides({"*Proj*": {"enable": False}, "blocks.?.ff": {"enable": False}})
    assert cfg.layer_config("proj_out").enable
    assert not cfg.layer_config("Proj_out").enable
    assert not cfg.layer_config("blocks.7.ff").enable
    assert cfg.layer_config("blocks.17.ff").enable


def test_reserved_names_match_through_a_glob():
    cfg = W8A8.with_overrides({"[v]ersion": {"enable": False}, "[d]efault": {"enable": False}})
    assert not cfg.layer_config("version").enable
    assert not cfg.layer_config("default").enable
    assert QuantizeConfig.from_dict(cfg.to_dict()) == cfg


def test_layer_config_is_cached():
    cfg = W8A8.with_overrides({"*a*": {"opt": {"alpha": 0.3}}})
    first = cfg.layer_config("blocks.a")
    assert cfg.layer_config("blocks.a") is first
    assert cfg == dataclasses.replace(cfg), "the cache takes no part in equality"


def test_layer_config_rejects_non_string_names():
    with pytest.raises(ConfigError, match=_m("module_name = 3: expected a str")):
        W8A8.layer_config(3)  # type: ignore[arg-type]


def test_multi_glob_combination_is_checked_at_resolution():
    cfg = QuantizeConfig.from_dict(
        {
            "default": {},
            "*fp8*": {"input_quant": {"type": "fp8"}, "weight_quant": {"type": "fp8"}},
            "*int*": {"input_quant": {"type": "int8"}},
        }
    )
    assert cfg.layer_config("x.fp8").weight_quant.type == "fpe4m3"
    with pytest.raises(
        ConfigError, match=_m("module 'x.fp8.int'") + r".*" + _m('"*fp8*" + "*int*".weight_quant')
    ):
        cfg.layer_config("x.fp8.int")


def test_each_glob_must_be_valid_over_the_default_alone():
    with pytest.raises(ConfigError, match=_m("\"*x*\".weight_quant.type = 'int8': cannot be combined")):
        QuantizeConfig.from_dict({"default": {}, "*x*": {"input_quant": {"type": "fp8"}}})


def test_disabled_glob_may_leave_weights_unquantized():
    cfg = W8A8.with_overrides({"*skip*": {"enable": False, "weight_quant": {"type": "fp16"}}})
    assert cfg.layer_config("skip").weight_quant == QuantSpec(type="fp16")


# ---------------------------------------------------------------------------------- with_overrides


def test_with_overrides_appends_merges_and_updates_default():
    cfg = W8A8.with_overrides({"*a*": {"opt": {"alpha": 0.1}}, "*b*": {"enable": False}})
    cfg2 = cfg.with_overrides({"*a*": {"calib": {"type": "percentile", "percentile": 99.0}}, "*c*": {}})
    assert [g for g, _ in cfg2.overrides] == ["*a*", "*b*", "*c*"], "existing globs keep their position"
    assert cfg2.overrides[0][1] == FrozenDict(
        {"opt": {"alpha": 0.1}, "calib": {"type": "percentile", "percentile": 99.0}}
    )
    cfg3 = cfg2.with_overrides({"default": {"real_quant": False, "opt": {"alpha": 0.7}}})
    assert cfg3.default == dataclasses.replace(W8A8.default, real_quant=False, opt=OptConfig(alpha=0.7))
    assert cfg3.overrides == cfg2.overrides
    assert W8A8.overrides == (), "presets are never modified"


def test_with_overrides_errors():
    with pytest.raises(ConfigError, match=_m("version = {}: 'version' is reserved")):
        W8A8.with_overrides({"version": {}})
    with pytest.raises(ConfigError, match=_m('"*a*".opt.alpha = 2')):
        W8A8.with_overrides({"*a*": {"opt": {"alpha": 2}}})
    with pytest.raises(ConfigError, match=_m("default.calib.type = 'kl'")):
        W8A8.with_overrides({"default": {"calib": {"type": "kl"}}})
    with pytest.raises(ConfigError, match=_m("overrides = ['*a*']: expected a mapping")):
        W8A8.with_overrides(["*a*"])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- error paths

ERROR_CASES = [
    # (id, config dict, regex the message must match)
    (
        "opt-type",
        {"default": {"opt": {"type": "foo"}}},
        _m("default.opt.type = 'foo'") + r".*'smooth', 'svd'",
    ),
    (
        "glob-input-type",
        {"default": {}, "*proj_out*": {"input_quant": {"type": "int3"}}},
        _m("\"*proj_out*\".input_quant.type = 'int3'") + r".*'int8', 'int4', 'fpe4m3', 'fp16', 'bf16'",
    ),
    ("quant-type-not-str", {"default": {"weight_quant": {"type": 8}}}, _m("default.weight_quant.type = 8")),
    (
        "calib-type",
        {"default": {"calib": {"type": "entropy"}}},
        _m("default.calib.type = 'entropy'") + ".*'gptq'",
    ),
    ("unknown-key", {"default": {"foo": 1}}, _m("default.foo = 1: unknown key") + r".*'dual_scale'"),
    (
        "unknown-nested-key",
        {"default": {"calib": {"type": "gptq", "blocksz": 64}}},
        _m("default.calib.blocksz = 64: unknown key") + ".*'blocksize'",
    ),
    ("unknown-glob-key", {"default": {}, "g*": {"bogus": 3}}, _m('"g*".bogus = 3: unknown key')),
    (
        "unknown-sac-key",
        {"default": {"opt": {"search_alpha_config": {"stop": 1}}}},
        _m("default.opt.search_alpha_config.stop = 1: unknown key") + ".*'step'",
    ),
    (
        "static-per-token",
        {"default": {"input_quant": {"axis": -1}}},
        _m("default.input_quant.axis = -1: static per-token") + ".*dynamic: true",
    ),
    (
        "activation-channel-axis",
        {"default": {"input_quant": {"axis": 0}}},
        _m("default.input_quant.axis = 0") + r".*\(allowed: None, -1\)",
    ),
    (
        "unknown-axis",
        {"default": {"weight_quant": {"axis": 2}}},
        _m("default.weight_quant.axis = 2: unknown axis"),
    ),
    ("bool-axis", {"default": {"weight_quant": {"axis": True}}}, _m("default.weight_quant.axis = True")),
    ("weight-per-token", {"default": {"weight_quant": {"axis": -1}}}, _m("default.weight_quant.axis = -1")),
    (
        "weight-fp16",
        {"default": {"weight_quant": {"type": "fp16"}}},
        _m("default.weight_quant.type = 'fp16': weights must be quantized") + ".*weight-only",
    ),
    (
        "weight-bf16-glob",
        {"default": {}, "*x*": {"weight_quant": {"type": "bf16"}}},
        _m("\"*x*\".weight_quant.type = 'bf16'") + r".*'int8'",
    ),
    (
        "asymmetric",
        {"default": {"weight_quant": {"symmetric": False}}},
        _m("default.weight_quant.symmetric = False: ")
        + _m("asymmetric quantization is not supported; use symmetric: true"),
    ),
    (
        "asymmetric-acts",
        {"default": {"input_quant": {"symmetric": False}}},
        _m("default.input_quant.symmetric = False: asymmetric quantization is not supported"),
    ),
    (
        "mixed-fp8-acts-int-weights",
        {"default": {"input_quant": {"type": "fpe4m3"}}},
        _m("default.weight_quant.type = 'int8': cannot be combined with input_quant.type = 'fpe4m3'"),
    ),
    (
        "mixed-int-acts-fp8-weights",
        {"default": {"weight_quant": {"type": "fp8"}}},
        _m("default.weight_quant.type = 'fpe4m3': cannot be combined with input_quant.type = 'int8'")
        + r".*\(allowed: 'int4', 'int8'\)",
    ),
    (
        "group-size-on-activations",
        {"default": {"input_quant": {"group_size": 64}}},
        _m("default.input_quant.group_size = 64: group_size applies to weights only"),
    ),
    (
        "group-size-zero",
        {"default": {"weight_quant": {"group_size": 0}}},
        _m("default.weight_quant.group_size = 0"),
    ),
    ("group-size-float", {"default": {"weight_quant": {"group_size": 64.0}}}, _m("group_size = 64.0")),
    (
        "dynamic-weights",
        {"default": {"weight_quant": {"dynamic": True}}},
        _m("default.weight_quant.dynamic = True") + ".*input_quant only",
    ),
    (
        "gptq-fp8",
        {
            "default": {
                "calib": {"type": "gptq"},
                "input_quant": {"type": "fp8"},
                "weight_quant": {"type": "fp8"},
            }
        },
        _m("default.calib.type = 'gptq': GPTQ supports integer weights only") + ".*'amax'",
    ),
    (
        "svd-without-rank",
        {"default": {"opt": {"type": "svd"}}},
        _m("default.opt.low_rank = None") + ".*requires",
    ),
    (
        "svd-rank-zero",
        {"default": {"opt": {"type": "svd", "low_rank": 0}}},
        _m("default.opt.low_rank = 0: expected an int >= 1"),
    ),
    (
        "rank-on-smooth",
        {"default": {"opt": {"type": "smooth", "low_rank": 8}}},
        _m("default.opt.low_rank = 8: only applies when type is 'svd', not 'smooth'"),
    ),
    (
        "alpha-on-default-opt",
        {"default": {"opt": {"type": "default", "alpha": 0.3}}},
        _m("default.opt.alpha = 0.3: only applies when type is 'smooth' or 'svd'"),
    ),
    (
        "alpha-range",
        {"default": {"opt": {"alpha": 1.5}}},
        _m("default.opt.alpha = 1.5: expected a number in [0, 1]"),
    ),
    ("alpha-nan", {"default": {"opt": {"alpha": float("nan")}}}, _m("default.opt.alpha = nan")),
    ("alpha-bool", {"default": {"opt": {"alpha": True}}}, _m("default.opt.alpha = True")),
    (
        "precision",
        {"default": {"opt": {"type": "svd", "low_rank": 4, "precision": "float16"}}},
        _m("default.opt.precision = 'float16'") + ".*'float32', 'float64'",
    ),
    (
        "alpha-search-min-gt-max",
        {"default": {"opt": {"search_alpha_config": {"min": 0.8, "max": 0.2}}}},
        _m("default.opt.search_alpha_config.min = 0.8: must not exceed max = 0.2"),
    ),
    (
        "alpha-search-step-zero",
        {"default": {"opt": {"search_alpha_config": {"step": 0}}}},
        _m("default.opt.search_alpha_config.step = 0: expected a number in (0, 1]"),
    ),
    (
        "alpha-search-step-negative",
        {"default": {"opt": {"search_alpha_config": {"step": -0.1}}}},
        _m("default.opt.search_alpha_config.step = -0.1"),
    ),
    (
        "alpha-search-enable",
        {"default": {"opt": {"search_alpha_config": {"enable": "yes"}}}},
        _m("default.opt.search_alpha_config.enable = 'yes': expected a bool"),
    ),
    (
        "percentile-zero",
        {"default": {"calib": {"type": "percentile", "percentile": 0}}},
        _m("default.calib.percentile = 0: expected a number in (0, 100]"),
    ),
    (
        "percentile-over",
        {"default": {"calib": {"type": "percentile", "percentile": 100.5}}},
        _m("default.calib.percentile = 100.5"),
    ),
    (
        "percentile-on-amax",
        {"default": {"calib": {"type": "amax", "percentile": 99.0}}},
        _m("default.calib.percentile = 99.0: only applies when type is 'percentile'"),
    ),
    (
        "mse-candidates",
        {"default": {"calib": {"type": "mse", "num_candidates": 0}}},
        _m("default.calib.num_candidates = 0"),
    ),
    (
        "gptq-blocksize",
        {"default": {"calib": {"type": "gptq", "blocksize": 0}}},
        _m("default.calib.blocksize = 0"),
    ),
    (
        "gptq-percdamp",
        {"default": {"calib": {"type": "gptq", "percdamp": 0.0}}},
        _m("default.calib.percdamp = 0.0: expected a number in (0, 1]"),
    ),
    (
        "gptq-groupsize",
        {"default": {"calib": {"type": "gptq", "groupsize": -2}}},
        _m("default.calib.groupsize = -2: expected an int >= 1 or one of -1"),
    ),
    (
        "gptq-groupsize-conflict",
        {
            "default": {
                "calib": {"type": "gptq", "groupsize": 32},
                "weight_quant": {"axis": 0, "group_size": 64},
            }
        },
        _m("default.calib.groupsize = 32: conflicts with weight_quant.group_size = 64"),
    ),
    (
        "gptq-actorder",
        {"default": {"calib": {"type": "gptq", "actorder": 1}}},
        _m("default.calib.actorder = 1: expected a bool"),
    ),
    ("enable-not-bool", {"default": {"enable": "yes"}}, _m("default.enable = 'yes': expected a bool")),
    (
        "dual-scale-not-bool",
        {"default": {"dual_scale": None}},
        _m("default.dual_scale = None: expected a bool"),
    ),
    (
        "unknown-pattern",
        {"default": {"search_patterns": ["linear_to_chunk", "linear_chunk"]}},
        _m("default.search_patterns = 'linear_chunk': unknown pattern name") + ".*'linear_to_chunk'",
    ),
    (
        "unknown-pattern-glob",
        {"default": {}, "*a*": {"search_patterns": ["nope"]}},
        _m("\"*a*\".search_patterns = 'nope'"),
    ),
    (
        "pattern-not-list",
        {"default": {"search_patterns": "linear_to_chunk"}},
        _m("default.search_patterns = 'linear_to_chunk': expected a list"),
    ),
    (
        "duplicate-pattern",
        {"default": {"search_patterns": ["linear_to_chunk", "linear_to_chunk"]}},
        _m("default.search_patterns = ['linear_to_chunk', 'linear_to_chunk']: duplicate pattern names"),
    ),
    (
        "fp16-input-dynamic",
        {"default": {"input_quant": {"type": "fp16", "dynamic": True}}},
        _m("default.input_quant.dynamic = True: only applies when type is"),
    ),
    ("missing-default", {"*a*": {}}, _m("missing required key 'default'")),
    ("config-not-mapping", ["default"], _m("config = ['default']: expected a mapping")),
    ("default-not-mapping", {"default": 5}, _m("default = 5: expected a mapping")),
    ("section-not-mapping", {"default": {"opt": "smooth"}}, _m("default.opt = 'smooth': expected a mapping")),
    (
        "glob-not-mapping",
        {"default": {}, "*a*": False},
        _m('"*a*" = False: expected a mapping of layer settings'),
    ),
    (
        "glob-section-not-mapping",
        {"default": {}, "*a*": {"calib": 3}},
        _m('"*a*".calib = 3: expected a mapping'),
    ),
    ("glob-key-not-str", {"default": {}, 3: {}}, _m("config = 3: glob keys must be non-empty strings")),
    ("empty-glob", {"default": {}, "": {}}, _m("config = '': glob keys must be non-empty strings")),
    ("newer-version", {"version": 2, "default": {}}, _m("version = 2: unsupported config version")),
    ("version-zero", {"version": 0, "default": {}}, _m("version = 0")),
    (
        "version-as-glob",
        {"version": {"enable": False}, "default": {}},
        _m("version = {'enable': False}: 'version'"),
    ),
]


@pytest.mark.parametrize(("data", "pattern"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_error_paths(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        QuantizeConfig.from_dict(data)


def test_newer_version_is_reported_before_unknown_keys():
    with pytest.raises(ConfigError, match=_m("version = 3")):
        QuantizeConfig.from_dict({"version": 3, "default": {"new_key_of_v3": 1}})


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError, match="unknown key"):
        QuantizeConfig.from_dict({"default": {"x": 1}})


# --------------------------------------------------------------------------------- the dataclasses


def test_dataclasses_are_frozen_keyword_only_and_hashable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        W8A8.default.enable = False  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        W8A8.default.opt.alpha = 0.1  # type: ignore[misc]
    with pytest.raises(TypeError):
        QuantSpec("int8")  # type: ignore[misc]
    with pytest.raises(TypeError):
        LayerConfig(True)  # type: ignore[misc]
    assert len({QuantSpec(), QuantSpec(), QuantSpec(type="int4")}) == 2
    cache = {W8A8.default: "a", W4A8: "b", SearchAlphaConfig(): "c", CalibConfig(type="gptq"): "d"}
    assert cache[QuantizeConfig.from_dict(W4A8.to_dict())] == "b"


def test_section_from_dict_and_to_dict():
    assert QuantSpec.from_dict({"type": "E4M3", "axis": 0}) == QuantSpec(type="fpe4m3", axis=0)
    assert OptConfig.from_dict({"type": "svd", "low_rank": 8}).to_dict() == {
        "type": "svd",
        "alpha": 0.5,
        "search_alpha_config": {"enable": False, "min": 0.0, "max": 1.0, "step": 0.1},
        "low_rank": 8,
        "precision": "float64",
    }
    assert CalibConfig.from_dict({"type": "mse"}).to_dict() == {"type": "mse", "num_candidates": 100}
    assert SearchAlphaConfig.from_dict({"enable": True}) == SearchAlphaConfig(enable=True)
    layer = LayerConfig.from_dict({"search_patterns": ["mine"]}, known_patterns=lambda: ["mine"])
    assert layer.search_patterns == ("mine",)
    assert LayerConfig.from_dict(layer.to_dict(), known_patterns=["mine"]) == layer


def test_dataclass_errors_name_relative_paths():
    with pytest.raises(ConfigError, match=_m("type = 'fp8': 'fp8' is an alias of 'fpe4m3'")):
        QuantSpec(type="fp8")
    with pytest.raises(ConfigError, match=_m("symmetric = False: asymmetric quantization is not supported")):
        QuantSpec(symmetric=False)
    with pytest.raises(ConfigError, match=_m("weight_quant.axis = 1") + ".*from_dict converts"):
        LayerConfig(weight_quant=QuantSpec(axis=1))
    with pytest.raises(ConfigError, match=_m("search_patterns = ['a']: expected a tuple")):
        LayerConfig(search_patterns=["a"])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=_m("search_patterns = '': pattern names must be non-empty")):
        LayerConfig(search_patterns=("",))
    with pytest.raises(ConfigError, match=_m("opt = {'type': 'svd'}: expected a OptConfig")):
        LayerConfig(opt={"type": "svd"})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=_m("search_alpha_config = None")):
        OptConfig(search_alpha_config=None)  # type: ignore[arg-type]


def test_dataclass_accepts_any_pattern_name():
    layer = LayerConfig(search_patterns=("my_custom", "activation_to_linear"))
    assert layer.segmentation_patterns == ("my_custom",)
    cfg = QuantizeConfig(default=layer)
    with pytest.raises(ConfigError, match=_m("default.search_patterns = 'my_custom'")):
        QuantizeConfig.from_dict(cfg.to_dict())
    assert QuantizeConfig.from_dict(cfg.to_dict(), known_patterns=["my_custom", *BUILTIN_PATTERNS]) == cfg


def test_quantize_config_constructor_validation():
    ok = QuantizeConfig(overrides=(("*a*", FrozenDict({"enable": False})),))
    assert ok.layer_config("a").enable is False
    with pytest.raises(ConfigError, match=_m("\"*a*\" = {'enable': False}: expected a FrozenDict")):
        QuantizeConfig(overrides=(("*a*", {"enable": False}),))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=_m("overrides = 'default': invalid glob")):
        QuantizeConfig(overrides=(("default", FrozenDict()),))
    with pytest.raises(ConfigError, match=_m("overrides = '*a*': duplicate glob")):
        QuantizeConfig(overrides=(("*a*", FrozenDict()), ("*a*", FrozenDict())))
    with pytest.raises(ConfigError, match=_m("overrides = [('*a*', FrozenDict({}))]: expected a tuple")):
        QuantizeConfig(overrides=[("*a*", FrozenDict())])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=_m("\"*a*\".input_quant.type = 'fp8'") + ".*alias"):
        QuantizeConfig(overrides=(("*a*", FrozenDict({"input_quant": {"type": "fp8"}})),))
    with pytest.raises(ConfigError, match=_m("version = 2")):
        QuantizeConfig(version=2)
    with pytest.raises(ConfigError, match=_m("default = {}: expected a LayerConfig")):
        QuantizeConfig(default={})  # type: ignore[arg-type]


def test_frozen_dict():
    fd = FrozenDict({"opt": {"alpha": 0.1}, "search_patterns": ["a", "b"]})
    assert isinstance(fd["opt"], FrozenDict)
    assert fd["search_patterns"] == ("a", "b")
    assert fd == {"opt": {"alpha": 0.1}, "search_patterns": ("a", "b")}
    assert hash(fd) == hash(FrozenDict({"search_patterns": ("a", "b"), "opt": FrozenDict({"alpha": 0.1})}))
    thawed = fd.thaw()
    assert thawed == {"opt": {"alpha": 0.1}, "search_patterns": ["a", "b"]}
    assert type(thawed["opt"]) is dict
    thawed["opt"]["alpha"] = 0.9
    assert fd["opt"]["alpha"] == 0.1
    with pytest.raises(TypeError):
        fd["x"] = 1  # type: ignore[index]


def test_configs_pickle_without_stale_hashes():
    cfg = W8A8.with_overrides({"*a*": {"opt": {"alpha": 0.2}}})
    hash(cfg.overrides[0][1])
    assert "_hash" not in str(cfg.overrides[0][1].__reduce__())
    clone = pickle.loads(pickle.dumps(cfg))
    assert clone == cfg
    assert hash(clone) == hash(cfg)
    assert clone.layer_config("a").opt.alpha == 0.2


# ------------------------------------------------------------------------------ patterns, versions


def test_validate_pattern_names():
    assert validate_pattern_names(["a", "b"], ["a", "b", "c"]) == ("a", "b")
    assert validate_pattern_names(("a",), lambda: {"a"}) == ("a",)
    with pytest.raises(ConfigError, match=_m("search_patterns = 'x': unknown pattern name") + r".*'a', 'b'"):
        validate_pattern_names(["a", "x"], ["b", "a"])
    with pytest.raises(ConfigError, match=_m("patterns = 7: unknown pattern name")):
        validate_pattern_names([7], ["a"], key="patterns")
    with pytest.raises(ConfigError, match=_m("search_patterns = 'a': expected a list")):
        validate_pattern_names("a", ["a"])


def test_glob_patterns_use_known_patterns():
    data = {"default": {}, "*a*": {"search_patterns": ["mine"]}}
    cfg = QuantizeConfig.from_dict(data, known_patterns=["mine"])
    assert cfg.layer_config("a").search_patterns == ("mine",)


def test_version_is_written_to_json_and_yaml_only():
    assert "version" not in W8A8.to_dict()
    assert W8A8.to_dict(include_version=True)["version"] == CONFIG_VERSION
    assert list(W8A8.to_dict(include_version=True))[0] == "version"
    assert json.loads(W8A8.to_json())["version"] == CONFIG_VERSION
    assert yaml.safe_load(W8A8.to_yaml())["version"] == CONFIG_VERSION
    assert QuantizeConfig.from_dict({"version": 1, "default": {}}) == QuantizeConfig()


# ------------------------------------------------------------------------------------- JSON / YAML


def test_json_and_yaml_parse_errors():
    with pytest.raises(ConfigError, match="config JSON could not be parsed"):
        QuantizeConfig.from_json("{not json")
    with pytest.raises(ConfigError, match="config YAML could not be parsed"):
        QuantizeConfig.from_yaml("default: [unclosed")
    with pytest.raises(ConfigError, match=_m("config = ['a']: expected a mapping")):
        QuantizeConfig.from_yaml("- a\n")
    with pytest.raises(ConfigError, match=_m("default.opt.type = 'x'")):
        QuantizeConfig.from_json('{"default": {"opt": {"type": "x"}}}')


def test_yaml_handwritten_reference_style():
    text = """
default:
  opt: {type: smooth, alpha: 0.5}
  calib: {type: amax}
  input_quant: {type: int8, axis: null}
  weight_quant: {type: int8, axis: 1}
"*proj_out*":
  enable: false
"""
    cfg = QuantizeConfig.from_yaml(text)
    assert cfg.default.weight_quant.axis == 0
    assert cfg.overrides == (("*proj_out*", FrozenDict({"enable": False})),)


def test_missing_pyyaml_raises_config_error_with_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(ConfigError, match="pip install pyyaml"):
        W8A8.to_yaml()
    with pytest.raises(ConfigError, match="pip install pyyaml"):
        QuantizeConfig.from_yaml("default: {}")
    assert QuantizeConfig.from_json(W8A8.to_json()) == W8A8, "JSON does not need PyYAML"


def test_importing_config_does_not_import_yaml():
    code = "import sys, segquant_fx.config; print('yaml' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------- check_supported


def test_check_supported():
    check_supported(W8A8, {"default", "smooth"}, {"amax"})
    check_supported("w8a8-fp8", {"default"}, {"amax"})
    check_supported(None, ["smooth"], ["amax"])
    with pytest.raises(
        ConfigError, match=_m("default.opt.type = 'smooth' is not yet available") + ".*'default'"
    ):
        check_supported(W8A8, {"default"}, {"amax"})
    with pytest.raises(ConfigError, match=_m("default.opt.type = 'svd' is not yet available")):
        check_supported("w4a8", {"default", "smooth"}, {"amax"})
    with pytest.raises(ConfigError, match=_m("default.calib.type = 'gptq' is not yet available")):
        check_supported("w4a8", {"default", "smooth", "svd"}, {"amax"})
    cfg = W8A8.with_overrides({"*x*": {"calib": {"type": "percentile"}}})
    with pytest.raises(ConfigError, match=_m("\"*x*\".calib.type = 'percentile' is not yet available")):
        check_supported(cfg, {"smooth"}, {"amax"})


def test_presets_construct_without_gating():
    assert W4A4.default.opt.type == "svd"
    assert W4A4.default.calib == CalibConfig(type="gptq")


# ------------------------------------------------------------------------------------------ ablation


def test_ablation_switches():
    no_seg = QuantizeConfig.ablation("w8a8", seglinear=False)
    assert (no_seg.default.seglinear, no_seg.default.dual_scale) == (False, True)
    assert no_seg.default.search_patterns == (DUAL_SCALE_PATTERN,)
    assert no_seg.default.segmentation_patterns == ()
    assert no_seg.default.uses_dual_scale

    no_dual = QuantizeConfig.ablation(W8A8, dual_scale=False)
    assert (no_dual.default.seglinear, no_dual.default.dual_scale) == (True, False)
    assert no_dual.default.search_patterns == SEGMENTATION_PATTERNS
    assert not no_dual.default.uses_dual_scale

    baseline = W4A8.without_segquant()
    assert (baseline.default.seglinear, baseline.default.dual_scale) == (False, False)
    assert baseline.default.search_patterns == ()
    restored = dataclasses.replace(
        baseline.default, seglinear=True, dual_scale=True, search_patterns=BUILTIN_PATTERNS
    )
    assert restored == W4A8.default, "nothing but the SegQuant switches changes"
    assert QuantizeConfig.ablation("w8a8") == W8A8


def test_ablation_patches_glob_entries_and_never_turns_things_on():
    cfg = W8A8.with_overrides(
        {
            "*a*": {"seglinear": True, "dual_scale": True, "search_patterns": list(BUILTIN_PATTERNS)},
            "*b*": {"opt": {"alpha": 0.3}},
        }
    )
    ablated = cfg.without_segquant()
    layer = ablated.layer_config("a")
    assert (layer.seglinear, layer.dual_scale, layer.search_patterns) == (False, False, ())
    assert ablated.layer_config("b").opt.alpha == 0.3
    off = dataclasses.replace(W8A8, default=dataclasses.replace(W8A8.default, seglinear=False))
    assert QuantizeConfig.ablation(off, seglinear=True).default.seglinear is False
    with pytest.raises(ConfigError, match=_m("seglinear = 0: expected a bool")):
        QuantizeConfig.ablation("w8a8", seglinear=0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------- hypothesis configs

unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
pos_unit = st.floats(min_value=0.0, max_value=1.0, exclude_min=True, allow_nan=False)


@st.composite
def quant_specs(draw):
    family = draw(st.sampled_from(["int", "fp8"]))
    weight_type = draw(st.sampled_from(["int8", "int4"])) if family == "int" else "fpe4m3"
    weight = QuantSpec(
        type=weight_type,
        axis=draw(st.sampled_from([None, 0])),
        group_size=draw(st.none() | st.integers(1, 512)),
    )
    if draw(st.booleans()):
        act = QuantSpec(type=draw(st.sampled_from(["fp16", "bf16"])))
    else:
        act_type = draw(st.sampled_from(["int8", "int4"])) if family == "int" else "fpe4m3"
        dynamic = draw(st.booleans())
        axis = draw(st.sampled_from([None, -1])) if dynamic else None
        act = QuantSpec(type=act_type, axis=axis, dynamic=dynamic)
    return act, weight


@st.composite
def opt_configs(draw):
    kind = draw(st.sampled_from(["default", "smooth", "svd"]))
    if kind == "default":
        return OptConfig(type="default")
    lo, hi = sorted(draw(st.lists(unit, min_size=2, max_size=2)))
    sac = SearchAlphaConfig(enable=draw(st.booleans()), min=lo, max=hi, step=draw(pos_unit))
    extra = {}
    if kind == "svd":
        extra = {
            "low_rank": draw(st.integers(1, 512)),
            "precision": draw(st.sampled_from(["float32", "float64"])),
        }
    return OptConfig(type=kind, alpha=draw(unit), search_alpha_config=sac, **extra)


@st.composite
def calib_configs(draw, int_weights: bool, group_size):
    kinds = ["amax", "percentile", "mse"] + (["gptq"] if int_weights else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "percentile":
        return CalibConfig(type=kind, percentile=draw(st.floats(0, 100, exclude_min=True, allow_nan=False)))
    if kind == "mse":
        return CalibConfig(type=kind, num_candidates=draw(st.integers(1, 10_000)))
    if kind == "gptq":
        groupsize = draw(st.sampled_from([-1, group_size]) if group_size else st.sampled_from([-1, 64, 128]))
        return CalibConfig(
            type=kind,
            blocksize=draw(st.integers(1, 4096)),
            percdamp=draw(pos_unit),
            groupsize=groupsize,
            actorder=draw(st.booleans()),
            static_groups=draw(st.booleans()),
            cpu_storage=draw(st.booleans()),
        )
    return CalibConfig(type=kind)


@st.composite
def layer_configs(draw):
    act, weight = draw(quant_specs())
    return LayerConfig(
        enable=draw(st.booleans()),
        seglinear=draw(st.booleans()),
        search_patterns=tuple(draw(st.lists(st.sampled_from(BUILTIN_PATTERNS), unique=True))),
        real_quant=draw(st.booleans()),
        dual_scale=draw(st.booleans()),
        opt=draw(opt_configs()),
        calib=draw(calib_configs(weight.type in ("int8", "int4"), weight.group_size)),
        input_quant=act,
        weight_quant=weight,
    )


LAYER_KEYS = [f.name for f in dataclasses.fields(LayerConfig)]
globs = st.text(alphabet="abz_.*?[]0123456789", min_size=1, max_size=12).filter(
    lambda g: g not in ("default", "version")
)


@st.composite
def partials(draw):
    """A glob entry: some top-level keys of another valid layer, sections sometimes partial."""
    source = draw(layer_configs()).to_dict()
    partial = {}
    for key in draw(st.lists(st.sampled_from(LAYER_KEYS), unique=True, max_size=4)):
        value = source[key]
        if isinstance(value, dict) and draw(st.booleans()):
            value = {k: v for k, v in value.items() if k != "type" and draw(st.booleans())}
        partial[key] = value
    return partial


@st.composite
def quantize_configs(draw):
    cfg = QuantizeConfig(default=draw(layer_configs()))
    entries = draw(st.dictionaries(globs, partials(), max_size=3))
    try:
        return cfg.with_overrides(entries)
    except ConfigError:
        assume(False)


@HYPOTHESIS
@given(quantize_configs())
def test_round_trips_of_generated_configs(cfg):
    data = cfg.to_dict()
    assert QuantizeConfig.from_dict(data) == cfg
    assert QuantizeConfig.from_dict(data).to_dict() == data
    assert QuantizeConfig.from_json(cfg.to_json()) == cfg
    assert QuantizeConfig.from_yaml(cfg.to_yaml()) == cfg
    assert hash(QuantizeConfig.from_json(cfg.to_json())) == hash(cfg)
    assert json.loads(json.dumps(data)) == data, "to_dict is plain JSON data"


@HYPOTHESIS
@given(layer_configs())
def test_layer_round_trip(layer):
    assert LayerConfig.from_dict(layer.to_dict()) == layer
    assert QuantizeConfig.coerce(layer).default is layer


TOKENS = ["attn", "ff", "norm", "proj", "to_q"]


@HYPOTHESIS
@given(
    default=layer_configs(),
    entries=st.lists(st.tuples(st.sampled_from(TOKENS), partials()), max_size=4, unique_by=lambda e: e[0]),
    name_tokens=st.lists(st.sampled_from(TOKENS), unique=True, max_size=3),
)
def test_resolution_applies_matching_globs_in_order(default, entries, name_tokens):
    try:
        cfg = QuantizeConfig(default=default).with_overrides({f"*{tok}*": p for tok, p in entries})
    except ConfigError:
        assume(False)
    name = "blocks.0." + ".".join(name_tokens)
    matching = [(tok, p) for tok, p in entries if tok in name]
    assert cfg.matching_globs(name) == tuple(f"*{tok}*" for tok, _ in matching)
    try:
        resolved = cfg.layer_config(name)
    except ConfigError:
        assume(False)
    if not matching:
        assert resolved is cfg.default
        return
    resolved_dict = resolved.to_dict()
    _, last = matching[-1]
    for key, value in last.items():
        if isinstance(value, dict):
            section = getattr(resolved, key)
            for sub_key, sub_value in value.items():
                actual = getattr(section, sub_key)
                if isinstance(actual, SearchAlphaConfig):
                    actual = actual.to_dict()
                assert actual == sub_value, (key, sub_key)
        else:
            assert resolved_dict[key] == value, key
    untouched = set(LAYER_KEYS) - {k for _, p in matching for k in p}
    for key in untouched:
        assert resolved_dict[key] == default.to_dict()[key], key
