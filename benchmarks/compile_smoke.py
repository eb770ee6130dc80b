"""One-shot check that a compiled quantized full-size backbone compiles and runs on the GPU.

``python benchmarks/compile_smoke.py --model sd35-medium --items 2`` builds the model (random bf16 weights),
runs ``segquant_fx.compile`` (quantize + Inductor) and one forward, and prints compile time, the first and
steady-state call times, which segquant ops ran on the CUDA library, and the error vs the float model.
Speed is measured in the end-to-end benchmark, not here.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch.utils import _pytree as pytree


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="sd35-medium")
    p.add_argument("--items", type=int, default=2)
    p.add_argument("--preset", default="w8a8")
    p.add_argument("--batch-size", type=int, default=2)
    args = p.parse_args()
    import segquant_fx
    from segquant_fx.models import build_model, calibration_items
    from segquant_fx.ops import cuda_kernels

    dev = "cuda"
    t0 = time.perf_counter()
    model, ex = build_model(args.model, args.batch_size, device=dev, dtype=torch.bfloat16)
    items = [pytree.tree_map(lambda v: v.to(dev, torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v, it)
             for it in calibration_items(args.model, args.items, args.batch_size)]
    print(f"build {time.perf_counter() - t0:.1f} s; CUDA library: {cuda_kernels.library_path()} "
          f"(registered {cuda_kernels.registered_ops()})", flush=True)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = segquant_fx.compile(model, items, args.preset, progress=False)
        t1 = time.perf_counter()
        with torch.no_grad():
            out = pytree.tree_leaves(fast(**ex))[0]
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            for _ in range(3):
                out = pytree.tree_leaves(fast(**ex))[0]
            torch.cuda.synchronize()
            t3 = time.perf_counter()
            ref = pytree.tree_leaves(model(**ex))[0]
    rel = float((out.float() - ref.float()).norm() / ref.float().norm())
    print(f"quantize+compile setup {t1 - t0:.1f} s; first call (Inductor compile) {t2 - t1:.1f} s; "
          f"steady call {(t3 - t2) / 3 * 1e3:.1f} ms; relative error vs bf16 float {rel:.4f}")
    for w in {str(w.message)[:220] for w in caught if "segquant" in str(w.message)}:
        print("warning:", w)
    print("OK" if torch.isfinite(out).all() else "NON-FINITE OUTPUT")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
