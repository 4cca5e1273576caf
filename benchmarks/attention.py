"""Attention kernels at the shapes a pretraining step really has, one SDPA backend against another.

The step's attention runs at four kinds of shape: the context encoder on the visible patches, the target
encoder on all patches (forward only), and the predictor on context + one target block per sequence, whose
head dim is small (512 / 16 = 32 for ViT-B). Each is timed forward + backward (the target encoder forward
only) for every backend that accepts it, with the shape fixed so cuDNN's plan cache is warm; cuDNN's first
call, which builds its plan, is reported on its own, since a step whose lengths change pays it again.
Lengths come from the mask sampler (configs' mask section), so they are the ones the step sees. On a GPU
`flex` is torch's FlexAttention, compiled per shape (its first call is the compile): Triton kernels whose
tiles inductor picks for the shape, a candidate for the predictor's short sequences and 32-wide heads, which
fill flash's 128 x 128 tiles poorly (it is not wired into the model; this says whether it is worth it).

    python benchmarks/attention.py [--config configs/base.yaml] [--batch 128] [--family rb tf] [--set k=v]

Prints per shape the ms per call and TFLOP/s for each backend, then per family the attention time of a
whole step (calls x depth) for each backend; the last line, `ratio:`, is the shipped backend's speed over
the fastest that `model.attention` can choose (its step attention time over the shipped one's; below 1: switch).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from ajepa.config import load_config  # noqa: E402
from ajepa.masking import sample_masks  # noqa: E402
from ajepa.train.pretrain import patch_grid  # noqa: E402

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
GPU_ONLY = ("flex",)  # FlexAttention has no backward on CPU
FIRST_CALL_SHOWN = ("cudnn", "flex")  # builds a plan / compiles on a shape's first call


def time_call(fn, warmup: int, reps: int, device: torch.device) -> float:
    """Median ms of `fn` over `reps` calls after `warmup` (CUDA events on a GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            import time
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def attention_call(backend: str, batch: int, heads: int, length: int, head_dim: int, backward: bool,
                   device: torch.device, dtype: torch.dtype):
    """One attention call (and its backward) on tensors laid out as the model's: q, k and v are views of one
    qkv projection (B, N, 3, H, d), and the output gradient arrives (B, N, H, d) from the out-projection, so the
    kernels see the step's strides. Gradients are returned, not accumulated into leaves from call to call."""
    qkv = torch.randn(batch, length, 3, heads, head_dim, device=device, dtype=dtype, requires_grad=backward)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    grad = torch.randn(batch, length, heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
    if backend == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        attend = torch.compile(flex_attention, dynamic=False)
        context = contextlib.nullcontext
    else:
        attend = F.scaled_dot_product_attention
        context = partial(sdpa_kernel, [BACKENDS[backend]])

    def call():
        with context():
            out = attend(q, k, v)
            if backward:
                torch.autograd.grad(out, qkv, grad)
    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/base.yaml")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--family", nargs="+", default=["rb", "tf"], choices=["rb", "tf"])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override, repeatable (e.g. model.pred_heads=8)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = load_config(args.config, args.set)
    m = cfg.model
    shipped = m.attention
    backends = [*(b for b in BACKENDS if b != "math"), *GPU_ONLY] if cuda else ["math"]
    grid = patch_grid(cfg)
    n_patches = grid[0] * grid[1]
    print(f"{torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, {dtype}; "
          f"{args.config}: encoder {m.num_heads} heads x {m.embed_dim // m.num_heads}, predictor {m.pred_heads} "
          f"heads x {m.pred_dim // m.pred_heads}; batch {args.batch}; shipped backend '{shipped}'")

    step_ms: dict[str, dict[str, float]] = {}
    for family in args.family:
        mcfg = load_config(args.config, [*args.set, f"mask.schedule={family}"]).mask
        masks = sample_masks(mcfg, grid, args.batch, step=0, total_steps=1, seed=0)
        n_ctx, (k, n_tgt) = masks.context.shape[1], masks.targets.shape[1:]
        # (name, sequences, heads, length, head dim, backward, calls per step)
        shapes = [
            ("context encoder", args.batch, m.num_heads, n_ctx, m.embed_dim // m.num_heads, True, m.depth),
            ("target encoder", args.batch, m.num_heads, n_patches, m.embed_dim // m.num_heads, False, m.depth),
            ("predictor", args.batch * k, m.pred_heads, n_ctx + n_tgt, m.pred_dim // m.pred_heads, True,
             m.pred_depth),
        ]
        print(f"\n=== {family}: context {n_ctx} patches, {k} targets of {n_tgt}, {n_patches} patches in all ===")
        totals = dict.fromkeys(backends, 0.0)
        for name, b, h, n, d, backward, calls in shapes:
            flops = 4 * b * h * n * n * d * (3 if backward else 1)  # backward = 2x forward's matmuls
            cells = []
            for backend in backends:
                try:
                    fn = attention_call(backend, b, h, n, d, backward, device, dtype)
                    first = time_call(fn, 0, 1, device)
                    ms = time_call(fn, 2, args.reps, device)
                except Exception as err:  # the backend does not take this shape, or fails to build for it
                    cells.append(f"{backend}: n/a ({str(err).splitlines()[0][:60]})")
                    totals[backend] = float("inf")
                    continue
                totals[backend] += ms * calls
                plan = f", first call {first:.0f} ms" if backend in FIRST_CALL_SHOWN else ""
                cells.append(f"{backend} {ms:6.2f} ms {flops / ms / 1e9:5.0f} TFLOP/s{plan}")
            print(f"  {name:15s} {b:4d} x {h:2d} heads x {n:4d} x {d:3d}{' fwd+bwd' if backward else ' fwd    '}: "
                  + " | ".join(cells), flush=True)
        step_ms[family] = totals
        print("  attention per step: " + ", ".join(f"{b} {t:.1f} ms" for b, t in totals.items()))

    shipped_name = shipped if shipped in backends else backends[0]
    ours = sum(t[shipped_name] for t in step_ms.values())
    choices = [b for b in backends if b not in GPU_ONLY]  # the ones model.attention can pick
    best_name = min(choices, key=lambda b: sum(t[b] for t in step_ms.values()))
    best = sum(t[best_name] for t in step_ms.values())
    print(f"\nattention of one step of each family: shipped '{shipped_name}' {ours:.1f} ms, fastest of "
          f"model.attention's choices '{best_name}' {best:.1f} ms"
          + "".join(f", {b} (not a choice yet) {sum(t[b] for t in step_ms.values()):.1f} ms"
                    for b in backends if b in GPU_ONLY))
    print(f"ratio: {best / ours:.3f}")


if __name__ == "__main__":
    main()
