"""The full layer's forward with queued candidates (`pend`, `full_attention._fwd_kernel`'s PEND).

Off the diagonal the running top list is not updated per key block: a block that beats a row's worst entry is
queued, and the queue is inserted in arrival order when some row's queue is full and after the loop. The selection
must be exactly the per-block update's (the float64 reference's, ties to the lower block index), at lengths with many
flushes mid-loop, with sub-blocks (BLOCK_N > block), GQA groups 1/4/16, batch 2, sinks, softcap, ties everywhere, and
the extend launch. Runs on CUDA, or on CPU under TRITON_INTERPRET=1.
"""

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from hysparse_compile.kernels import reference  # noqa: E402
from hysparse_compile.kernels.triton import full_attention as fa  # noqa: E402
from hysparse_compile.kernels.triton.full_attention_extend import full_attention_extend  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def tiles(monkeypatch, block_n, pend):
    monkeypatch.setattr(fa, "TMA_FAILED", {})
    cfg = {"BLOCK_M": 64, "BLOCK_N": block_n, "num_warps": 4, "num_stages": 1, "pend": pend}
    if fa.INTERPRET:
        monkeypatch.setattr(fa, "INTERPRET_FWD_CONFIG", cfg)
    else:
        monkeypatch.setattr(fa, "FWD_CONFIG", {**fa.FWD_CONFIG, **cfg})


def qkv(B, Hq, Hkv, T, d, seed, ties=False, levels=0):
    """ties: every 16-key block holds the same keys, so each row's block maxima all tie. levels: every logit is
    `level * 4` for a level drawn per (batch, head, block) from 0..levels-1, so candidates that compete for the
    same slot often tie (the queue must insert them in arrival order for the lower block to win)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, d, generator=g) for h in (Hq, Hkv, Hkv))
    if ties:
        k = k[:, :, :16].repeat(1, 1, -(-T // 16), 1)[:, :, :T].contiguous()
    if levels:
        q = torch.zeros_like(q)
        q[..., 0] = 1.0
        k = torch.zeros_like(k)
        k[..., 0] = torch.randint(0, levels, (B, Hkv, -(-T // 16)), generator=g).repeat_interleave(16, -1)[..., :T] * 4.0
    return q.to(DEV), k.to(DEV), v.to(DEV)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


CASES = {  # name: (B, Hq, Hkv, T, d, topk, BLOCK_N, pend, options); block 16 throughout
    "g4_nsel2_pend1": (2, 4, 1, 333, 16, 32, 16, 1, {}),
    "g4_nsel4_pend2_sub": (2, 4, 1, 301, 16, 64, 32, 2, {}),
    "g1_nsel4_pend4_sinks": (1, 2, 2, 290, 16, 64, 16, 4, {"sinks": True}),
    "g16_nsel2_pend8_softcap": (1, 16, 1, 257, 16, 32, 32, 8, {"softcap": 5.0}),
    "g4_nsel4_pend2_ties": (2, 4, 1, 310, 16, 64, 16, 2, {"ties": True}),
    "g4_nsel8_pend4_sub_ties": (1, 8, 2, 400, 16, 128, 32, 4, {"ties": True}),
    "g4_nsel2_pend4_levels": (2, 4, 1, 330, 16, 32, 16, 4, {"levels": 4}),
    "g1_nsel4_pend8_sub_levels": (1, 2, 2, 390, 16, 64, 32, 8, {"levels": 6}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_queued_selection_is_the_per_block_selection(monkeypatch, case):
    B, Hq, Hkv, T, d, topk, block_n, pend, opt = CASES[case]
    q, k, v = qkv(B, Hq, Hkv, T, d, seed=len(case), ties=opt.get("ties", False), levels=opt.get("levels", 0))
    kw = {}
    if opt.get("sinks"):
        kw["sinks"] = torch.randn(Hq, generator=torch.Generator().manual_seed(3)).to(DEV)
    if opt.get("softcap"):
        kw["softcap"] = opt["softcap"]
    scale = d ** -0.5
    tiles(monkeypatch, block_n, 0)
    base = fa.full_attention_fwd(q, k, v, 16, topk, scale, False, **kw)
    tiles(monkeypatch, block_n, pend)
    out, idx, lse, _ = fa.full_attention_fwd(q, k, v, 16, topk, scale, False, **kw)
    ref = reference.full_attention_fwd(q.double(), k.double(), v.double(), 16, topk, scale, False,
                                       **{n: (x.double() if torch.is_tensor(x) else x) for n, x in kw.items()})
    assert torch.equal(idx, base[1]), "the queue changed the selection"
    assert torch.equal(idx, ref[1].to(idx.dtype))
    assert torch.equal(out, base[0]) and torch.equal(lse, base[2])  # the flash pass itself is untouched
    assert rel(out, ref[0]) < 2e-5


def test_ties_pick_the_lower_block_everywhere(monkeypatch):
    """Identical blocks: each row's block maxima all tie, so its selection is the lowest nsel blocks it sees."""
    q, k, v = qkv(1, 4, 1, 200, 16, seed=5, ties=True)
    tiles(monkeypatch, 16, 2)
    _, idx, _, _ = fa.full_attention_fwd(q, k, v, 16, 64, 0.25, False)
    t = torch.arange(200, device=DEV)
    want = torch.arange(4, device=DEV).expand(200, 4).clone()
    want[t < 48] = torch.where(torch.arange(4, device=DEV) <= (t[t < 48] // 16)[:, None],
                               torch.arange(4, device=DEV), -1)
    assert torch.equal(idx[0, 0].long(), want)


def test_extend_with_the_queue_matches_the_reference(monkeypatch):
    B, Hq, Hkv, S, d, R = 2, 4, 1, 320, 16, 70
    q, kc, vc = qkv(B, Hq, Hkv, S, d, seed=8)
    q = q[:, :, :R].contiguous()
    start = torch.tensor([150, 250], dtype=torch.int32, device=DEV)
    r_out, r_idx = reference.full_attention_extend(q.double(), kc.double(), vc.double(), start, 16, 64, 0.25)
    tiles(monkeypatch, 32, 4)
    out, idx = full_attention_extend(q, kc, vc, start, 16, 64, 0.25)
    assert rel(out, r_out) < 2e-5 and torch.equal(idx, r_idx.to(idx.dtype))


@pytest.mark.parametrize("pend,block_n", [(3, 16), (1, 32), (-2, 16)])
def test_a_queue_that_cannot_hold_a_tile_is_refused(monkeypatch, pend, block_n):
    q, k, v = qkv(1, 4, 1, 40, 16, seed=1)
    tiles(monkeypatch, block_n, pend)
    with pytest.raises(ValueError, match=rf"pend={pend}.*power of two at least BLOCK_N // block_size"):
        fa.full_attention_fwd(q, k, v, 16, 32, 0.25, False)
