"""The baselines of the benchmarks: dense attention (SDPA cuDNN, SDPA flash, Flex causal), the NSA
selected-attention kernel of flash-linear-attention, and the device copy bandwidth. They are timed with
`bench.timer.time_ms`, the one timer.

Every function returns a zero-argument callable to time, built once on given inputs (so building is not timed).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .timer import time_ms


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    n = nbytes // 4 if device.type == "cuda" else (64 << 20) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


class Rotor:
    """Cycles through several input sets so that repeated calls do not find their inputs in cache."""

    def __init__(self, sets: list):
        self.sets, self.i, self.note = sets, 0, None

    def next(self):
        s = self.sets[self.i % len(self.sets)]
        self.i += 1
        return s


# ------------------------------------------------------------------------------------------------ dense attention
def sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "math": SDPBackend.MATH}[backend_name]

    def run(q, k, v, causal=True):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])

    return run


def repeat_kv(s):
    """(q, k, v, dout) with k/v expanded from Hkv to Hq heads (query head h reads KV head h // G)."""
    q, k, v, dout = s
    G = q.shape[1] // k.shape[1]
    rep = lambda t: t.detach().repeat_interleave(G, dim=1).requires_grad_(t.requires_grad)  # noqa: E731
    return q, rep(k), rep(v), dout


def sdpa_call(backend_name: str, rotor: Rotor, backward: bool, causal: bool = True):
    """SDPA with one backend (cudnn | flash | math), GQA through enable_gqa. Returns (fn, grad_to_none).

    rotor yields (q, k, v, dout) sets; with backward, q/k/v must require grad."""
    run = sdpa(backend_name)
    q0, k0, v0, _ = rotor.sets[0]
    try:
        run(q0, k0, v0, causal)  # raises here (not inside the timer) when the backend cannot run this case
    except RuntimeError:
        if q0.shape[1] == k0.shape[1]:
            raise
        rotor.sets = [repeat_kv(s) for s in rotor.sets]  # this backend lacks enable_gqa: repeat K/V heads untimed
        rotor.note = "K/V heads repeated outside the timer (no enable_gqa support)"
        run(*rotor.sets[0][:3], causal)
    if not backward:
        def fwd():
            q, k, v, _ = rotor.next()
            return run(q, k, v, causal)
        return fwd, None

    def fwd_bwd():
        q, k, v, dout = rotor.next()
        run(q, k, v, causal).backward(dout)

    return fwd_bwd, [t for s in rotor.sets for t in s[:3]]


def flex_causal_call(rotor: Rotor, backward: bool, scale: float):
    """FlexAttention causal (compiled on CUDA), GQA through enable_gqa, the same wrapper our flex backend uses."""
    from hysparse_compile.kernels.flex.full_attention import causal_block_mask, flex_attend

    q0 = rotor.sets[0][0]
    mask = causal_block_mask(q0.shape[2], q0.device)
    if not backward:
        def fwd():
            q, k, v, _ = rotor.next()
            return flex_attend(q, k, v, mask, scale)[0]
        return fwd, None

    def fwd_bwd():
        q, k, v, dout = rotor.next()
        flex_attend(q, k, v, mask, scale)[0].backward(dout)

    return fwd_bwd, [t for s in rotor.sets for t in s[:3]]


# ------------------------------------------------------------------------------------------------ NSA (fla-core)
def nsa_available() -> str | None:
    """None when fla's NSA kernel can be imported, else why not."""
    try:
        from fla.ops.nsa.parallel import ParallelNSAFunction  # noqa: F401
    except ImportError as e:
        return f"fla not installed ({e})"
    return None


def nsa_inputs(q, k, v, indices):
    """Our layout -> fla's: q [B, T, Hq, d], k/v [B, T, Hkv, d], block_indices long [B, T, Hkv, nsel] (-1 skipped
    by the kernel). Converted once, outside the timed call."""
    return (q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(),
            indices.transpose(1, 2).contiguous().long())


def nsa_call(qt, kt, vt, idx_t, block_size: int, scale: float, backward: bool, dout_t=None):
    """fla-core 0.6.0's selected-attention kernel alone (`ParallelNSAFunction`, what `parallel_nsa` runs for the
    selected branch when it is given block_indices; no compression or window branch, no gate).
    Needs Hq / Hkv a power of two >= 16. Returns (fn, grad_to_none); outputs [B, T, Hq, d]."""
    from fla.ops.nsa.parallel import ParallelNSAFunction

    nsel = idx_t.shape[-1]

    def fwd():
        return ParallelNSAFunction.apply(qt, kt, vt, idx_t, nsel, block_size, scale, None)

    if not backward:
        return fwd, None

    def fwd_bwd():
        fwd().backward(dout_t)

    return fwd_bwd, [qt, kt, vt]
