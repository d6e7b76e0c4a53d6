"""A cached call's K/V writes in one launch per layer (Triton): the new tokens' keys and values into their slots.

The runtime (`runtime/layers.py`, `write_linear` / `write_ring`) stores a layer's new K/V [B, Hkv, R, d] at slot
`positions[b, r]` of a linear cache, or `positions[b, r] % W` of an SWA ring of W slots. As two `scatter_`s (one
for K, one for V, each reading an index expanded to every element) plus, for a ring, a `remainder` kernel, that is
three launches per layer and step; here it is one. At decode (R = 1, batch 8) the write is a few kilobytes, so its
cost is the launches: on the H100 the scatters took 5.2 us each, 84 us of a 6.5 ms step (docs/benchmarks.md,
"Decode on the H100 (call h)"). Every stride comes from the tensors, so the model's transposed K/V views and
caches that are views of larger storage are written in place.
"""

import torch
import triton
import triton.language as tl

from .common import INTERPRET


@triton.jit
def _write_kv_kernel(K, V, KC, VC, POS, skb, skh, skt, svb, svh, svt, scb, sch, sct, sdb, sdh, sdt, spb, spr,
                     H, R, W, S, D: tl.constexpr, RING: tl.constexpr):
    """One program per (b, h, r) new row: K[b, h, r] -> KC[b, h, slot], V likewise; slot = POS[b, r] (% W). A slot
    past the cache's S rows is not written (the runtime reserves room before a call; a CUDA graph replayed past
    it must not write outside the cache)."""
    pid = tl.program_id(0)
    r = pid % R
    bh = pid // R
    h = (bh % H).to(tl.int64)
    b = (bh // H).to(tl.int64)
    pos = tl.load(POS + b * spb + r * spr).to(tl.int64)
    slot = pos % W if RING else pos
    dd = tl.arange(0, D)
    rows = slot + tl.zeros([D], tl.int64)  # the slot, once per element (a vector mask for the stores)
    ok = (rows >= 0) & (rows < S)
    k = tl.load(K + b * skb + h * skh + r * skt + dd)
    v = tl.load(V + b * svb + h * svh + r * svt + dd)
    tl.store(KC + b * scb + h * sch + slot * sct + dd, k.to(KC.dtype.element_ty), mask=ok)
    tl.store(VC + b * sdb + h * sdh + slot * sdt + dd, v.to(VC.dtype.element_ty), mask=ok)


def fused_write_supported(k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> bool:
    """Whether `write_kv` can store these tensors: real CUDA tensors (or any under the interpreter; not fake or
    functional ones), a power-of-two head dim of unit stride on every side, the cache's dtype equal to the new
    K/V's. Whether a trace is running is the caller's question (`functional.tracing()`, `runtime.layers`)."""
    ts = (k, v, kc, vc)
    if any(type(t) is not torch.Tensor for t in ts):  # fake / functional tensors: a trace, not a run
        return False
    if not (INTERPRET or all(t.is_cuda for t in ts)):
        return False
    d = k.shape[-1]
    return (d & (d - 1) == 0 and d >= 1 and all(t.stride(-1) == 1 for t in ts)
            and kc.dtype == k.dtype and vc.dtype == v.dtype)


def write_kv(k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, positions: torch.Tensor,
             ring: int | None = None) -> None:
    """kc[b, h, positions[b, r]] = k[b, h, r] (and vc from v), in place; with `ring=W` the slot is positions % W.

    k/v [B, H, R, d], kc/vc [B, H, S, d] (unit last stride), positions int [B, R] on their device; slots outside
    0 .. S-1 are skipped."""
    B, H, R, d = k.shape
    if B * H * R == 0:
        return
    _write_kv_kernel[(B * H * R,)](
        k, v, kc, vc, positions, *k.stride()[:3], *v.stride()[:3], *kc.stride()[:3], *vc.stride()[:3],
        positions.stride(0), positions.stride(1), H, R, ring or 1, kc.shape[2], D=d, RING=ring is not None,
        num_warps=1)


__all__ = ["fused_write_supported", "write_kv"]
