"""Where a decode step's GPU time goes: the model of bench_decode.py, one context and batch, kernels by GPU time.

    python -m bench.profile_decode --context 131072 --batch 8        # hybrid(8, 3) and the all-full baseline
"""
from __future__ import annotations

import argparse

import torch

from . import bench_decode as bd
from .timer import kernel_times


def kernel_table(model, B: int, ctx: int, steps: int = 5) -> list[tuple[str, float, int]]:
    device = torch.device("cuda")
    cache = bd.fill_cache(model, B, ctx, margin=4 * steps + 8)
    ids = torch.randint(0, model.config.vocab_size, (B, 1), device=device)
    pos = torch.full((B, 1), ctx, device=device, dtype=torch.long)

    def step():
        return model(ids, position_ids=pos, past_key_values=cache, use_cache=True)

    with torch.no_grad():
        rows = kernel_times(step, reps=steps)
    del cache
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    model = bd.build_llama(False, torch.device("cuda"), torch.bfloat16)
    for name, pattern in (("hysparse", None), ("dense_floor", "F" * 8)):
        compiled = bd.hs.compile(model, bd.schedule(False, pattern))
        rows = kernel_table(compiled, args.batch, args.context)
        total = sum(t for _, t, _ in rows)
        print(f"\n## {name}: B={args.batch}, context={args.context}: {total:.3f} ms of kernels per step")
        print("| kernel | ms/step | calls/step |\n|---|---|---|")
        for n, t, c in rows[:args.top]:
            print(f"| {n} | {t:.4f} | {c} |")


if __name__ == "__main__":
    main()
