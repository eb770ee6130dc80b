"""Built-in tiny text-to-image models trained on procedural colored shapes.

Three diffusers backbones in 32x32 pixel space, each with a tiny word-level text encoder: an SD3.5-style
MMDiT (``"mmdit"``), a FLUX-style transformer (``"flux"``) and an SDXL-style UNet (``"unet"``). They give
quantization something with trained activation statistics to work on, offline, in seconds on a CPU.

::

    from segquant_fx import t2i
    bundle = t2i.load_builtin("mmdit")                       # trained weights shipped in the package
    images = t2i.generate(bundle, ["a small red circle at the top left on a blue background"], seeds=[0])
    t2i.score_adherence(images, t2i.parse_prompts([...]))    # prompt adherence via the attribute read-out

    items = []                                               # calibration items = backbone kwargs dicts
    t2i.generate(bundle, prompts, seeds, record=items)
    qmodel = segquant_fx.quantize(bundle.backbone, items, "w8a8")
    t2i.generate(bundle, prompts, seeds, backbone=qmodel)   # same seeds, quantized backbone

Modules: :mod:`~segquant_fx.t2i.data` (scene generator, prompts, tokens), :mod:`~segquant_fx.t2i.readout`
(attribute read-out, adherence, features, Frechet distance), :mod:`~segquant_fx.t2i.text` (text encoder),
:mod:`~segquant_fx.t2i.models` (builders, bundle, weights), :mod:`~segquant_fx.t2i.diffusion` (objectives,
samplers, :func:`generate`), :mod:`~segquant_fx.t2i.train` (training; entry point
``benchmarks/train_t2i.py``). ``python3 -m segquant_fx.t2i install FILE.tar`` installs trained weights.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule (lazy, so `import segquant_fx.t2i` does not import diffusers)
_LAZY: dict[str, str] = {
    "MODEL_NAMES": "models",
    "T2IBundle": "models",
    "T2IModelSpec": "models",
    "build_bundle": "models",
    "load_builtin": "models",
    "load_bundle": "models",
    "save_bundle": "models",
    "generate": "diffusion",
    "SceneConfig": "data",
    "Scenes": "data",
    "sample_scenes": "data",
    "heldout_scenes": "data",
    "render": "data",
    "scene_prompts": "data",
    "parse_prompts": "data",
    "tokenize": "data",
    "read_attributes": "readout",
    "score_adherence": "readout",
    "chance_adherence": "readout",
    "image_features": "readout",
    "frechet_distance": "readout",
    "install_weights": "install",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'segquant_fx.t2i' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"segquant_fx.t2i.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
