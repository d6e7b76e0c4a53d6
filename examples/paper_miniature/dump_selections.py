"""Dump the key blocks trained full layers select on held-out text, with locality statistics.

    python examples/paper_miniature/dump_selections.py runs/hysparse-1_3_s0 runs/full_s0 --out selections.npz

For a compiled run the selections are those the model itself makes in its forward: every call of
`hs.functional.full_attention` during one forward is recorded (the compiled graph's full layers call it). For a plain
run (`full`) each layer's q, k, v are taken by a forward pre-hook on its attention module and passed to
`hs.functional.full_attention` with the run's block size and top-k: the selection that layer would hand to sparse
layers (what `mode="training_free"` uses).

Locality: per KV group and 64-token query tile, the number of distinct blocks in the union of the tile's selections
(what a tile-based sparse kernel must load), against the same counts drawn uniformly at random among each token's
visible blocks. Also the share of selections that are block 0 (sink-like) and the query's own block. Only tiles at
positions >= top-k count (before that every visible block is selected). The .npz holds, per run and full layer L,
`<run>/layer<L>_indices` (int16 [Hkv, T, nsel]: the first window's selected key blocks per KV group and query token,
nsel = topk / block_size, ascending, -1 = none), `<run>/layer<L>_union` and `_random_union` (int32 [seqs * Hkv,
T / 64]: distinct blocks per tile, trained and random) and `summary_json` (a 0-d string: per run, the settings and
per-layer means). The example's README describes the format.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

import common
import hysparse_compile as hs
import variants
from common import console
from corpus import Corpus

TILE = 64


@contextlib.contextmanager
def recording_full_attention(sink: list):
    """While active, every `hs.functional.full_attention` call appends its indices to `sink` (the compiled graph's
    full layers look the function up at call time)."""
    original = hs.functional.full_attention

    def recorder(*args, **kwargs):
        result = original(*args, **kwargs)
        sink.append(result[1].detach().cpu())
        return result

    hs.functional.full_attention = recorder
    try:
        yield sink
    finally:
        hs.functional.full_attention = original


def plain_selections(built, x, sparse) -> list[torch.Tensor]:
    """Indices int32 [B, Hkv, T, nsel] of every layer of a plain module, from its own q/k/v (pre-hooks)."""
    out, handles = [], []
    for block in built.plain.h:
        def hook(module, inputs):
            h, cos, sin, _ = inputs
            q, k, v = module.qkv(h, cos, sin)
            out.append(hs.functional.full_attention(q, k, v, block_size=sparse.block_size, topk=sparse.topk)[1].cpu())
        handles.append(block.attn.register_forward_pre_hook(hook))
    try:
        built.plain(x)
    finally:
        for h in handles:
            h.remove()
    return out


def union_per_tile(idx: np.ndarray, tile: int) -> np.ndarray:
    """idx int [G, T, nsel] (-1 padded) -> distinct selected blocks per tile [G, T // tile]."""
    G, T, _ = idx.shape
    out = np.zeros((G, T // tile), dtype=np.int32)
    for g in range(G):
        for i in range(T // tile):
            sel = idx[g, i * tile:(i + 1) * tile].ravel()
            out[g, i] = len(np.unique(sel[sel >= 0]))
    return out


def random_union_per_tile(counts: np.ndarray, block: int, tile: int, rng) -> np.ndarray:
    """The same number of selections per token (counts [G, T]) drawn uniformly among its visible blocks."""
    G, T = counts.shape
    out = np.zeros((G, T // tile), dtype=np.int32)
    for g in range(G):
        for i in range(T // tile):
            t = np.arange(i * tile, (i + 1) * tile)
            visible = t // block + 1  # blocks 0 .. t // block
            keys = rng.random((tile, int(visible.max())))
            keys[np.arange(int(visible.max()))[None, :] >= visible[:, None]] = np.inf  # not yet visible
            order = np.argsort(keys, axis=1)
            chosen = [order[r, :counts[g, t[r]]] for r in range(tile)]
            out[g, i] = len(np.unique(np.concatenate(chosen)))
    return out


def stats(indices: list[torch.Tensor], layers: list[int], sparse, rng) -> tuple[dict, dict]:
    """Summary per layer and the arrays to save."""
    summary, arrays = {}, {}
    for layer, ind in zip(layers, indices):
        idx = ind.numpy()  # [B, Hkv, T, nsel]
        B, H, T, nsel = idx.shape
        flat = idx.reshape(B * H, T, nsel)
        real = union_per_tile(flat, TILE)
        rand = random_union_per_tile((flat >= 0).sum(-1), sparse.block_size, TILE, rng)
        first = sparse.topk // TILE  # tiles whose tokens see more than top-k tokens
        valid = flat >= 0
        own = (flat == (np.arange(T) // sparse.block_size)[None, :, None]) & valid
        summary[f"layer {layer}"] = {
            "union_blocks_per_tile": float(real[:, first:].mean()) if real.shape[1] > first else None,
            "random_union_blocks_per_tile": float(rand[:, first:].mean()) if rand.shape[1] > first else None,
            "min_possible": nsel, "blocks_per_token": nsel,
            "share_block0": float((flat == 0).sum() / valid.sum()),
            "share_own_block": float(own.sum() / valid.sum()),
        }
        arrays[f"layer{layer}_indices"] = idx[0].astype(np.int16)
        arrays[f"layer{layer}_union"] = real
        arrays[f"layer{layer}_random_union"] = rand
    return summary, arrays


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", type=Path, nargs="+", help="run folders (train.py output)")
    ap.add_argument("--out", type=Path, default=Path("selections.npz"))
    ap.add_argument("--data", type=Path, default=common.HERE / "data")
    ap.add_argument("--seqs", type=int, default=4, help="held-out windows")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backend", default="auto", choices=("auto", "reference", "flex", "triton"))
    args = ap.parse_args(argv)
    device = common.pick_device(args.device)
    corpus = Corpus(args.data)
    rng = np.random.default_rng(0)
    arrays, summary = {}, {}
    for run in args.runs:
        config = common.read_json(run / "config.json")
        built = variants.load_run(config, torch.load(run / "model.pt", map_location=device), device=device,
                                  backend=args.backend)
        built.model.eval()
        sparse = variants.SparseSettings(**config["sparse"])
        context = config["base_model"]["context"]
        x = torch.from_numpy(corpus.fixed_windows("val", count=args.seqs, length=context).astype(np.int64)).to(device)
        with torch.no_grad(), common.autocast(device):
            if built.schedule is not None:
                layers = [s.index for s in built.schedule.layers if s.role == "full"]
                with recording_full_attention([]) as got:
                    built.model(x)
                method = "recorded from the compiled model's forward"
                if len(got) != len(layers):
                    raise RuntimeError(f"{run.name}: recorded {len(got)} full_attention calls for {len(layers)} full "
                                       f"layers; the compiled graph no longer calls hs.functional.full_attention")
            else:
                layers = list(range(built.cfg.n_layer))
                got = plain_selections(built, x, sparse)
                method = "hs.functional.full_attention on each layer's q/k/v (plain module)"
        s, a = stats(got, layers, sparse, rng)
        summary[run.name] = {"method": method, "block_size": sparse.block_size, "topk": sparse.topk, "tile": TILE,
                             "seqs": args.seqs, "context": context, "layers": s}
        arrays.update({f"{run.name}/{k}": v for k, v in a.items()})
        for layer, row in s.items():
            console.print(f"{run.name} {layer}: {row['union_blocks_per_tile']} distinct blocks per {TILE}-token tile "
                          f"(random {row['random_union_blocks_per_tile']}, floor {row['min_possible']}); "
                          f"block 0 {row['share_block0']:.2f}, own block {row['share_own_block']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, summary_json=np.array(json.dumps(summary)), **arrays)
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
