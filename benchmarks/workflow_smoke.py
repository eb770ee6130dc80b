"""One-shot check of the diffusion workflow on a full-size pipeline (random weights) on the GPU.

``python benchmarks/workflow_smoke.py --pipeline sd35-medium --size 1024 --steps 8 --per-sample 2 --prompts 2``
builds the published pipeline (``sd35-medium``, ``flux-dev`` or ``sdxl-base``; random weights, local
tokenizers) on CUDA, records a calibration set (``generate_calibrate_set``, UniformSampler), quantizes the
backbone on it, generates one image with the float and one with the quantized backbone (with an
IdentityStepper, so the stepper hook runs at full size), and prints the phase times, peak GPU memory and
the image difference. Correctness of the pieces is covered by tests/unit/workflow; this only checks that
the full-size shapes go through.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pipeline", default="sd35-medium", choices=["sd35-medium", "flux-dev", "sdxl-base"])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--per-sample", type=int, default=2, help="steps recorded per prompt")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--preset", default="w8a8")
    p.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    args = p.parse_args()

    import segquant_fx
    from segquant_fx.calibset import UniformSampler, generate_calibrate_set, load_calibrate_set
    from segquant_fx.models.pipelines import backbone_of, family_of
    from segquant_fx.stepper import IdentityStepper

    dev, dtype = "cuda", getattr(torch, args.dtype)
    t0 = time.perf_counter()
    pipe = segquant_fx.build_pipeline(args.pipeline, device=dev, dtype=dtype)
    torch.cuda.synchronize()
    print(
        f"build {args.pipeline}: {time.perf_counter() - t0:.1f} s, {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    )
    layer = "unet" if family_of(pipe) == "sdxl" else "transformer"
    run = {"height": args.size, "width": args.size}
    prompts = [f"a photo of object number {i}" for i in range(args.prompts)]

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        calib = generate_calibrate_set(
            pipe,
            UniformSampler(),
            prompts,
            layer,
            dump_path=d,
            num_inference_steps=args.steps,
            timestep_per_sample=args.per_sample,
            **run,
        )
        print(f"calibration set: {len(calib)} items in {time.perf_counter() - t0:.1f} s")
        backbone = backbone_of(pipe, layer)
        t0 = time.perf_counter()
        items = load_calibrate_set(d, device=dev)  # items stored on the CPU, moved on access
        qmodel = segquant_fx.quantize(backbone, items, args.preset)
        torch.cuda.synchronize()
        print(f"quantize {args.preset}: {time.perf_counter() - t0:.1f} s, {len(qmodel.plan)} layers")

    def image(**kw):
        g = torch.Generator("cpu").manual_seed(0)
        t = time.perf_counter()
        out = pipe(
            prompts[0], num_inference_steps=args.steps, generator=g, output_type="np", **run, **kw
        ).images
        torch.cuda.synchronize()
        return out, time.perf_counter() - t

    ref, t_ref = image()
    setattr(pipe, layer, qmodel)
    stepper = IdentityStepper("uncond" if family_of(pipe) != "flux" else "text")
    out, t_q = image(stepper=stepper)
    assert len(stepper.calls) == args.steps, stepper.calls
    print(
        f"generate: float {t_ref:.1f} s, quantized + stepper {t_q:.1f} s; mean |diff| {np.abs(out - ref).mean():.4f}"
    )
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
