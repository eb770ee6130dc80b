"""Model builders, bundle call signature, weights save/load/install, load_builtin."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch

from segquant_fx.errors import ConfigError, SerializationError
from segquant_fx.t2i import models
from segquant_fx.t2i.data import MAX_TOKENS, tokenize
from segquant_fx.t2i.install import install_weights
from segquant_fx.t2i.models import (
    BACKBONE_FILE,
    CARD_FILE,
    MODEL_NAMES,
    TEXT_ENCODER_FILE,
    get_spec,
    load_builtin,
    load_bundle,
    pack_pixels,
    save_bundle,
    unpack_pixels,
)
from segquant_fx.t2i.text import TextEncoderConfig, TinyTextEncoder

EXPECTED = {
    # name: (class, backbone params, nn.Linear count)
    "mmdit": ("SD3Transformer2DModel", 3_236_812, 86),
    "flux": ("FluxTransformer2DModel", 3_152_716, 80),
    "unet": ("UNet2DConditionModel", 3_612_803, 139),
}
MAX_BYTES = 8_000_000


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_builders_param_counts_and_features(name, bundle_of):
    b = bundle_of(name)
    cls, n_params, n_linear = EXPECTED[name]
    assert type(b.backbone).__name__ == cls
    assert sum(p.numel() for p in b.backbone.parameters()) == n_params
    assert sum(isinstance(m, torch.nn.Linear) for m in b.backbone.modules()) == n_linear
    assert sum(p.numel() for p in b.text_encoder.parameters()) == 120_064
    cfg = b.backbone.config
    if name == "mmdit":  # SD3.5 features: dual attention and RMS qk-norm
        assert tuple(cfg.dual_attention_layers) == (0, 1, 2) and cfg.qk_norm == "rms_norm"
        assert (
            sum(hasattr(blk, "attn2") and blk.attn2 is not None for blk in b.backbone.transformer_blocks) == 3
        )
        assert cfg.patch_size == 2
    if name == "flux":
        assert len(b.backbone.transformer_blocks) == 3 and len(b.backbone.single_transformer_blocks) == 5
    if name == "unet":
        assert cfg.addition_embed_type == "text_time" and cfg.use_linear_projection


def test_builders_are_deterministic():
    a = models.build_bundle("flux", seed=3)
    b = models.build_bundle("flux", seed=3)
    c = models.build_bundle("flux", seed=4)
    sa, sb, sc = a.backbone.state_dict(), b.backbone.state_dict(), c.backbone.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_saved_weights_fit_the_budget_and_round_trip(name, bundle_of, tmp_path):
    b = bundle_of(name)
    d = save_bundle(b, tmp_path / name, card={"note": "random weights"})
    sizes = {f: (d / f).stat().st_size for f in (BACKBONE_FILE, TEXT_ENCODER_FILE)}
    assert sizes[BACKBONE_FILE] + sizes[TEXT_ENCODER_FILE] <= MAX_BYTES, sizes
    card = json.loads((d / CARD_FILE).read_text())
    assert card["note"] == "random weights" and card["architecture"]["name"] == name
    assert card["weights_dtype"] == "float16"
    loaded = load_bundle(d)
    for mod_a, mod_b in ((b.backbone, loaded.backbone), (b.text_encoder, loaded.text_encoder)):
        sa, sb = mod_a.state_dict(), mod_b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sb[k].dtype == torch.float32
            assert torch.equal(sa[k].half().float(), sb[k]), k  # exactly the float16-rounded weights
    assert not loaded.backbone.training and loaded.spec == get_spec(name)


def test_load_builtin_missing_weights_says_how_to_train(tmp_path, monkeypatch):
    """Without shipped weights, load_builtin raises SerializationError with the train and install commands."""
    monkeypatch.setattr(models, "WEIGHTS_ROOT", tmp_path)
    with pytest.raises(SerializationError, match=r"no trained weights.*train_t2i\.py --model unet.*install"):
        load_builtin("unet")
    with pytest.raises(ConfigError, match="unknown text-to-image model 'sd9'"):
        load_builtin("sd9")


def test_load_builtin_reads_weights_saved_in_the_weights_dir(bundle_of, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "WEIGHTS_ROOT", tmp_path)
    b = bundle_of("mmdit", small=True)
    # small variant saved under the built-in name: the card's architecture decides what is built
    save_bundle(b, tmp_path / "mmdit", card={"sampling": {"steps": 7, "guidance": 2.5}})
    loaded = load_builtin("mmdit")
    assert loaded.spec.config["num_layers"] == 2
    assert loaded.default_steps == 7 and loaded.default_guidance == 2.5
    x = torch.randn(2, 3, 32, 32)
    tokens, pooled = loaded.encode(["a red circle on a blue background"] * 2)
    with torch.no_grad():
        out_a = b.predict(x, torch.full((2,), 0.5), *b.encode(["a red circle on a blue background"] * 2))
        out_b = loaded.predict(x, torch.full((2,), 0.5), tokens, pooled)
    assert (out_a - out_b).abs().max() < 0.05  # only float16 rounding of the weights differs


def test_corrupt_or_mismatched_weights_raise(bundle_of, tmp_path):
    """Missing files, bad JSON, truncated safetensors and wrong architectures give SerializationError."""
    b = bundle_of("flux", small=True)
    d = save_bundle(b, tmp_path / "w")
    (d / TEXT_ENCODER_FILE).write_bytes((d / TEXT_ENCODER_FILE).read_bytes()[:100])
    with pytest.raises(SerializationError, match="not a readable safetensors file"):
        load_bundle(d)
    d = save_bundle(b, tmp_path / "w2")
    card = json.loads((d / CARD_FILE).read_text())
    card["architecture"]["config"]["num_single_layers"] = 2
    (d / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(SerializationError, match="does not match the architecture"):
        load_bundle(d)
    card["architecture"]["model_class"] = "Evil"
    (d / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(SerializationError, match="model_class='Evil'"):
        load_bundle(d)
    (d / CARD_FILE).write_text("{not json")
    with pytest.raises(SerializationError, match="not valid JSON"):
        load_bundle(d)
    (d / BACKBONE_FILE).unlink()
    with pytest.raises(SerializationError, match="backbone.safetensors is missing"):
        load_bundle(d)


def _tar(tmp_path, members: dict[str, bytes]):
    path = tmp_path / "w.tar"
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_install_weights_from_tar(bundle_of, tmp_path, monkeypatch):
    from segquant_fx.t2i.train import pack_dir

    monkeypatch.setattr(models, "WEIGHTS_ROOT", tmp_path / "pkg")
    d = save_bundle(bundle_of("unet", small=True), tmp_path / "out" / "unet")
    tar = pack_dir(d, tmp_path / "out" / "t2i-unet.tar")
    target = install_weights(tar)
    assert target == tmp_path / "pkg" / "unet"
    assert load_builtin("unet").spec.config["block_out_channels"] == (16, 32)
    install_weights(tar)  # re-installing replaces the previous weights
    assert sorted(p.name for p in (tmp_path / "pkg").iterdir()) == ["unet"]


@pytest.mark.parametrize(
    ("members", "match"),
    [
        ({"../evil.txt": b"x"}, "unexpected member"),
        ({"/abs/unet/model_card.json": b"x"}, "unexpected member"),
        ({"unet/evil.py": b"x"}, "unexpected member"),
        ({"unet/model_card.json": b"{}"}, r"missing \['backbone.safetensors'"),
        ({"unet/model_card.json": b"{}", "flux/model_card.json": b"{}"}, "expected exactly one"),
    ],
)
def test_install_refuses_unexpected_tars(tmp_path, monkeypatch, members, match):
    """Path traversal, foreign files, incomplete or mixed tars are refused before anything is written."""
    monkeypatch.setattr(models, "WEIGHTS_ROOT", tmp_path / "pkg")
    with pytest.raises(SerializationError, match=match):
        install_weights(_tar(tmp_path, members))
    assert not (tmp_path / "pkg").exists() or not any((tmp_path / "pkg").iterdir())


def test_install_refuses_weights_that_do_not_load(tmp_path, monkeypatch):
    """A tar with the right names but unloadable weights leaves no installed directory behind."""
    monkeypatch.setattr(models, "WEIGHTS_ROOT", tmp_path / "pkg")
    tar = _tar(
        tmp_path,
        {
            "unet/model_card.json": b"{}",
            "unet/backbone.safetensors": b"",
            "unet/text_encoder.safetensors": b"",
        },
    )
    with pytest.raises(SerializationError, match="format-1 model card"):
        install_weights(tar)
    assert not (tmp_path / "pkg" / "unet").exists()
    assert not any(p.name.startswith(".install") for p in (tmp_path / "pkg").iterdir())


def test_pack_unpack_round_trip():
    x = torch.randn(3, 3, 32, 32)
    p = pack_pixels(x)
    assert p.shape == (3, 256, 12)
    assert torch.equal(
        p[0, 0], torch.stack([x[0, c, i, j] for c in range(3) for i in range(2) for j in range(2)])
    )
    assert torch.equal(unpack_pixels(p), x)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_backbone_kwargs_follow_the_pipeline_conventions(name, bundle_of):
    b = bundle_of(name, small=True)
    x = torch.randn(2, 3, 32, 32)
    if name == "flux":
        x = pack_pixels(x)
    tokens, pooled = b.encode(["a red circle on a blue background", ""])
    assert tokens.shape == (2, MAX_TOKENS, 128) and pooled.shape == (2, 128)
    t = torch.tensor([0.25, 0.75]) if b.spec.objective == "flow" else torch.tensor([10.0, 900.0])
    kw = b.backbone_kwargs(x, t, tokens, pooled)
    with torch.no_grad():
        out = b.backbone(**kw, return_dict=False)[0]
    assert out.shape == x.shape
    if name == "mmdit":
        assert torch.equal(kw["timestep"], t * 1000)  # SD3 pipelines pass sigma * 1000
    elif name == "flux":
        assert (
            torch.equal(kw["timestep"], t)
            and kw["img_ids"].shape == (256, 3)
            and kw["txt_ids"].shape == (MAX_TOKENS, 3)
        )
        assert kw["img_ids"][17].tolist() == [0.0, 1.0, 1.0]
    else:
        assert kw["added_cond_kwargs"]["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2


def test_text_encoder_shapes_and_errors():
    te = TinyTextEncoder(TextEncoderConfig(token_dim=48, pooled_dim=16)).eval()
    ids = tokenize(["a red circle on a blue background", ""])
    tokens, pooled = te(ids)
    assert tokens.shape == (2, MAX_TOKENS, 48) and pooled.shape == (2, 16)
    # the empty prompt pools to zeros before the projection
    assert torch.allclose(pooled[1], te.pooled_proj.bias)
    with pytest.raises(ConfigError, match="integer token ids"):
        te(ids.float())
    with pytest.raises(ConfigError, match="heads=3 must divide width=64"):
        TextEncoderConfig(heads=3)


def test_unknown_model_name():
    """get_spec lists the built-in names."""
    with pytest.raises(ConfigError, match="built-in models: mmdit, flux, unet"):
        get_spec("sdxl")
