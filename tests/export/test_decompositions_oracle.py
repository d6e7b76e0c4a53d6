"""export/decompositions.py (the ATen form of the four ops that every standard-ONNX and AOTI file runs, decode on CUDA
too) against the float64 oracle (tests/oracle.py for prefill, tests/oracle_model.py for decode), not the reference
backend: random gates and sinks, T not a multiple of the block, T < top-k, GQA groups 1/2/4, batch 2 with rows at
different positions, every mode the op expresses (paper, kv_sharing none / both, no SWA, training-free merge).
The default run samples the grid; `--full` (marker full_grid) adds the rest."""
import pytest
import torch
from oracle import oracle_full, oracle_sparse, random_indices, rel_err
from oracle_model import full_decode, ring_of, sparse_decode

from hysparse_compile.export import decompositions as D

BLOCK, D_HEAD = 16, 16
TOL = 1e-5  # fp32 against float64, relative to max(1, max |ref|); measured <= 4e-7


def full_grid(*values):
    return pytest.param(*values, marks=pytest.mark.full_grid)


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen)


# ---------------------------------------------------------------------------------------------- full attention
FULL_CASES = [  # B, Hq, Hkv, T, topk
    (2, 4, 4, 45, 32),  # G = 1; 3 blocks, the last partial; 2 selected
    (2, 8, 2, 45, 32),  # G = 4
    (2, 4, 2, 20, 64),  # T < top-k: every candidate block selected, -1 padding
    (1, 4, 1, 1, 32),  # one token
    full_grid(2, 16, 4, 77, 48),
    full_grid(3, 8, 8, 130, 32),
    full_grid(2, 4, 1, 64, 128),
]


@pytest.mark.parametrize("B, Hq, Hkv, T, topk", FULL_CASES)
def test_full_attention_decomposition_equals_the_oracle(gen, B, Hq, Hkv, T, topk):
    q, k, v = randn(gen, B, Hq, T, D_HEAD), randn(gen, B, Hkv, T, D_HEAD), randn(gen, B, Hkv, T, D_HEAD)
    out, indices, _, scores = D.full_attention(q, k, v, BLOCK, topk, 0.3, True)
    want_out, want_scores, want_indices = oracle_full(q, k, v, BLOCK, topk, 0.3)
    assert indices.dtype == torch.int32 and torch.equal(indices.long(), want_indices)
    assert rel_err(out, want_out) <= TOL
    assert rel_err(scores, want_scores) <= TOL


@pytest.mark.parametrize("B, Hq, Hkv, T", [(2, 8, 2, 45), full_grid(1, 4, 4, 1)])
def test_full_attention_decomposition_lse_is_the_log_sum_exp_of_the_causal_logits(gen, B, Hq, Hkv, T):
    q, k, v = randn(gen, B, Hq, T, D_HEAD), randn(gen, B, Hkv, T, D_HEAD), randn(gen, B, Hkv, T, D_HEAD)
    lse = D.full_attention(q, k, v, BLOCK, 32, 0.3, False)[2]
    logits = q.double() @ k.double().repeat_interleave(Hq // Hkv, 1).transpose(-1, -2) * 0.3
    want = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).logsumexp(-1)
    assert lse.dtype == torch.float32 and rel_err(lse, want) <= TOL


# ---------------------------------------------------------------------------------------------- sparse attention
# mode -> (k_own source, k_shared source, window, gate_sparse, gate_swa, sinks, merge); "own" = the layer's own K/V,
# "full" = another layer's (the full layer's); gates "element" [.., d] / "head" [.., 1]
MODES = {
    "paper-element": ("own", "full", 8, "element", "element", True, False),
    "paper-head": ("own", "full", 8, "head", "head", True, False),
    "kv_none": ("own", "own", 8, "element", "element", True, False),
    "kv_both": ("full", "full", 8, "element", "head", True, False),
    "no_swa": ("own", "full", None, "element", None, True, False),
    "no_sinks": ("own", "full", 8, "head", "element", False, False),
    "merge": ("own", "own", 8, None, None, False, True),
    "merge-sinks": ("own", "own", 8, None, None, True, True),
    "merge-no-window": ("own", "own", None, None, None, False, True),
}
SPARSE_SHAPES = [(2, 4, 2, 45), (2, 4, 4, 45), (2, 8, 2, 10)]  # G = 2, G = 1, G = 4 with T < top-k (-1 padded)
SPARSE_SAMPLE = {("paper-element", 0), ("paper-head", 0), ("kv_both", 0), ("no_swa", 0), ("merge", 0), ("kv_none", 1),
                 ("merge-sinks", 1), ("paper-element", 2), ("merge-no-window", 2)}  # (mode, shape) of the default run


def _sparse_cases():
    for i, (B, Hq, Hkv, T) in enumerate(SPARSE_SHAPES):
        for mode in MODES:
            yield pytest.param(mode, B, Hq, Hkv, T, id=f"{mode}-{B}x{Hq}x{Hkv}x{T}",
                               marks=() if (mode, i) in SPARSE_SAMPLE else pytest.mark.full_grid)


def _gate(gen, kind, B, Hq, R):
    return None if kind is None else torch.rand(B, Hq, R, D_HEAD if kind == "element" else 1, generator=gen)


def _sparse_inputs(gen, mode, B, Hq, Hkv, T):
    own_src, shared_src, window, gs, gw, has_sinks, merge = MODES[mode]
    q = randn(gen, B, Hq, T, D_HEAD)
    kv = {"own": (randn(gen, B, Hkv, T, D_HEAD), randn(gen, B, Hkv, T, D_HEAD)),
          "full": (randn(gen, B, Hkv, T, D_HEAD), randn(gen, B, Hkv, T, D_HEAD))}
    indices = random_indices(B, Hkv, T, BLOCK, 2, generator=gen)  # a random valid selection (2 of up to 3 blocks)
    return dict(q=q, k_own=kv[own_src][0], v_own=kv[own_src][1], k_shared=kv[shared_src][0],
                v_shared=kv[shared_src][1], indices=indices, gate_sparse=_gate(gen, gs, B, Hq, T),
                gate_swa=_gate(gen, gw, B, Hq, T), sinks=randn(gen, Hq) if has_sinks else None, window=window,
                merge=merge)


@pytest.mark.parametrize("mode, B, Hq, Hkv, T", list(_sparse_cases()))
def test_sparse_attention_decomposition_equals_the_oracle(gen, mode, B, Hq, Hkv, T):
    x = _sparse_inputs(gen, mode, B, Hq, Hkv, T)
    out = D.sparse_attention(x["q"], x["k_own"], x["v_own"], x["k_shared"], x["v_shared"], x["indices"],
                             x["gate_sparse"], x["gate_swa"], x["sinks"], BLOCK, x["window"] or 0, 0.3, x["merge"],
                             False)[0]
    want = oracle_sparse(x["q"], x["k_own"], x["v_own"], x["k_shared"], x["v_shared"], x["indices"], BLOCK,
                         x["window"], x["gate_sparse"], x["gate_swa"], x["sinks"], 0.3, x["merge"])
    assert out.shape == x["q"].shape and rel_err(out, want) <= TOL


# ---------------------------------------------------------------------------------------------- decode
S = 40  # cache slots; rows hold 37 and 5 tokens (the new one included): slots past them must be ignored
CACHE_LEN = torch.tensor([37, 5], dtype=torch.int32)


@pytest.mark.parametrize("Hq, Hkv, topk", [(4, 2, 32), (8, 2, 32), (4, 4, 64), full_grid(16, 4, 48),
                                           full_grid(4, 1, 16)])
def test_full_attention_decode_decomposition_equals_the_oracle(gen, Hq, Hkv, topk):
    q, k, v = randn(gen, 2, Hq, 1, D_HEAD), randn(gen, 2, Hkv, S, D_HEAD), randn(gen, 2, Hkv, S, D_HEAD)
    out, indices = D.full_attention_decode(q, k, v, CACHE_LEN, BLOCK, topk, 0.3)
    want_out, want_indices = full_decode(q, k, v, CACHE_LEN, BLOCK, topk, 0.3)
    assert indices.shape == (2, Hkv, 1, topk // BLOCK) and torch.equal(indices.long(), want_indices)
    assert rel_err(out, want_out) <= TOL


DECODE_MODES = {  # mode -> (window source: "ring" | "own" (a linear cache of its own) | "full", MODES entry)
    "paper-element": "ring", "paper-head": "ring", "no_swa": "ring", "no_sinks": "ring", "kv_none": "own",
    "kv_both": "full", "merge": "own", "merge-sinks": "own", "merge-no-window": "own",
}


DECODE_SAMPLE = {("paper-element", 8), ("paper-head", 11), ("no_swa", 8), ("kv_none", 8), ("kv_both", 8),
                 ("merge", 8), ("merge-sinks", 11)}  # (mode, W) of the default run; W = 8 is the window, 11 more


def _decode_cases():
    for W in (8, 11):
        for mode in DECODE_MODES:
            yield pytest.param(mode, W, id=f"{mode}-W{W}", marks=() if (mode, W) in DECODE_SAMPLE else
                               pytest.mark.full_grid)


@pytest.mark.parametrize("mode, W", list(_decode_cases()))
def test_sparse_attention_decode_decomposition_equals_the_oracle(gen, mode, W):
    """The new token of each row against the full layer's cache at the selected blocks and the SWA window: paper
    mode reads the window from a ring (position p in slot p % W; slots holding no position are filled with 1e3),
    kv_sharing none / merge from the layer's own linear cache, both from the full layer's."""
    B, Hq, Hkv = 2, 4, 2
    _, shared_src, window, gs, gw, has_sinks, merge = MODES[mode]
    q = randn(gen, B, Hq, 1, D_HEAD)
    k_full, v_full, k_own, v_own = (randn(gen, B, Hkv, S, D_HEAD) for _ in range(4))
    k_sh, v_sh = (k_full, v_full) if shared_src == "full" else (k_own, v_own)
    source = DECODE_MODES[mode]
    if source == "ring":
        k_win, v_win = ring_of(k_own, CACHE_LEN, W), ring_of(v_own, CACHE_LEN, W)
    else:
        k_win, v_win = (k_own, v_own) if source == "own" else (k_full, v_full)
    indices = torch.stack([random_indices(1, Hkv, int(n), BLOCK, 2, generator=gen)[0, :, -1:] for n in CACHE_LEN])
    gate_sparse, gate_swa = _gate(gen, gs, B, Hq, 1), _gate(gen, gw, B, Hq, 1)
    sinks = randn(gen, Hq) if has_sinks else None
    out = D.sparse_attention_decode(q, k_win, v_win, k_sh, v_sh, indices, CACHE_LEN, gate_sparse, gate_swa, sinks,
                                    BLOCK, window or 0, 0.3, merge)
    want = sparse_decode(q, k_win, v_win, k_sh, v_sh, indices, CACHE_LEN, BLOCK, window, gate_sparse, gate_swa,
                         sinks, 0.3, merge)
    assert rel_err(out, want) <= TOL


def test_decode_oracle_is_row_t_of_the_prefill_oracle(gen):
    """The decode oracle (written from the decode contract) agrees with the prefill oracle's row t = cache_len - 1:
    the two oracles check each other."""
    B, Hq, Hkv, T, W = 1, 4, 2, 37, 8
    q, k, v, k_own, v_own = (randn(gen, B, h, T, D_HEAD) for h in (Hq, Hkv, Hkv, Hkv, Hkv))
    gate_sparse, gate_swa = torch.rand(B, Hq, T, D_HEAD, generator=gen), torch.rand(B, Hq, T, 1, generator=gen)
    sinks = randn(gen, Hq)
    out, _, indices = oracle_full(q, k, v, BLOCK, 32, 0.3)
    cache_len = torch.tensor([T], dtype=torch.int32)
    dec_out, dec_indices = full_decode(q[:, :, -1:], k, v, cache_len, BLOCK, 32, 0.3)
    assert torch.equal(dec_indices, indices[:, :, -1:]) and rel_err(dec_out, out[:, :, -1:]) <= 1e-12
    sparse = oracle_sparse(q, k_own, v_own, k, v, indices, BLOCK, 8, gate_sparse, gate_swa, sinks, 0.3)
    ring_k, ring_v = ring_of(k_own, cache_len, W), ring_of(v_own, cache_len, W)
    dec = sparse_decode(q[:, :, -1:], ring_k, ring_v, k, v, indices[:, :, -1:], cache_len, BLOCK, 8,
                        gate_sparse[:, :, -1:], gate_swa[:, :, -1:], sinks, 0.3)
    assert rel_err(dec, sparse[:, :, -1:]) <= 1e-12
