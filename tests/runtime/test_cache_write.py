"""One launch per layer for a cached call's K/V writes (`kernels.triton.cache_write`): the same cache bytes as the
runtime's `scatter_`s, for linear caches and SWA rings (positions wrapping, more new tokens than slots), the model's
transposed K/V views, caches that are views of larger storage, batch > 1, GQA; and, through the runtime, the same
logits for a whole cached decode. Runs on CUDA, or on CPU under TRITON_INTERPRET=1."""
import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from hysparse_compile.kernels.triton import cache_write  # noqa: E402
from hysparse_compile.runtime import layers  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def scatter_reference(k, v, kc, vc, positions, ring=None):
    kc, vc = kc.clone(), vc.clone()
    slots = positions if ring is None else torch.remainder(positions, ring)
    idx = slots.view(k.shape[0], 1, -1, 1).expand_as(k)
    kc.scatter_(2, idx, k)
    vc.scatter_(2, idx, v)
    return kc, vc


CASES = {  # name: (B, H, R, d, S, ring, transposed new K/V, cache a view of larger storage)
    "decode_linear": (3, 4, 1, 16, 40, None, False, False),
    "extend_linear_transposed": (2, 1, 5, 64, 33, None, True, False),
    "decode_ring_wraps": (2, 4, 1, 32, 8, 8, False, True),
    "extend_ring_wraps_transposed": (3, 2, 6, 16, 8, 8, True, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_launch_writes_what_the_scatters_write(case):
    B, H, R, d, S, ring, transposed, view = CASES[case]
    g = torch.Generator().manual_seed(len(case))
    if transposed:  # the model's [B, R, H, d] projections seen as [B, H, R, d]
        k, v = (torch.randn(B, R, H, d, generator=g).to(DEV, torch.bfloat16).transpose(1, 2) for _ in range(2))
    else:
        k, v = (torch.randn(B, H, R, d, generator=g).to(DEV, torch.bfloat16) for _ in range(2))
    if view:  # a cache that is a slice of a larger allocation (rows of a bigger batch, more heads)
        big = torch.randn(B + 1, H + 2, S, d, generator=g).to(DEV, torch.bfloat16)
        kc, vc = big[1:, 1:H + 1], big[1:, 1:H + 1].clone()
    else:
        kc, vc = (torch.randn(B, H, S, d, generator=g).to(DEV, torch.bfloat16) for _ in range(2))
    start = torch.randint(0, 3 * S if ring else S - R + 1, (B,), generator=g)
    positions = (start[:, None] + torch.arange(R)).to(DEV)
    want_k, want_v = scatter_reference(k, v, kc, vc, positions, ring)
    before = big.clone() if view else None
    assert cache_write.fused_write_supported(k, v, kc, vc)
    cache_write.write_kv(k, v, kc, vc, positions, ring=ring)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    if view:  # nothing outside the view moved
        mask = torch.ones_like(big, dtype=torch.bool)
        mask[1:, 1:H + 1] = False
        assert torch.equal(big[mask], before[mask])


def test_slots_past_the_cache_are_not_written():
    """A position past the cache's rows (a CUDA graph replayed beyond what was reserved) writes nothing, not outside
    the tensor: the cache is a view of a larger buffer here, and the rows after it stay as they were."""
    big = torch.zeros(1, 2, 12, 16, device=DEV)
    kc, vc = big[:, :, :8], big[:, :, :8].clone()
    k = torch.ones(1, 2, 2, 16, device=DEV)
    cache_write.write_kv(k, k, kc, vc, torch.tensor([[7, 8]], device=DEV))
    assert (big[:, :, 7] == 1).all() and (big[:, :, 8:] == 0).all() and (vc[:, :, 7] == 1).all()


def test_what_the_kernel_cannot_write_goes_to_the_scatters():
    k = torch.zeros(1, 2, 1, 16, device=DEV)
    assert cache_write.fused_write_supported(k, k, k.clone(), k.clone())
    assert not cache_write.fused_write_supported(k, k, k.half(), k.half())  # dtype: the runtime's error path
    odd = torch.zeros(1, 2, 1, 24, device=DEV)
    assert not cache_write.fused_write_supported(odd, odd, odd, odd)
    strided = torch.zeros(1, 2, 1, 32, device=DEV)[..., ::2]
    assert not cache_write.fused_write_supported(strided, strided, strided, strided)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():  # a trace (torch.export's fake tensors) sees the scatters
        f = torch.zeros(1, 2, 1, 16)
        assert not cache_write.fused_write_supported(f, f, f, f)


def test_a_trace_gets_the_scatters(monkeypatch):
    """Under jit tracing (or torch.compile / torch.export) a direct launch would run once and be missing from the
    trace: the runtime leaves the write to its scatters, which the trace records."""
    k = torch.ones(1, 2, 1, 16, device=DEV)
    kc, vc = torch.zeros(1, 2, 4, 16, device=DEV), torch.zeros(1, 2, 4, 16, device=DEV)
    pos = torch.tensor([[1]], device=DEV)
    monkeypatch.setattr(layers, "FUSED_WRITES", "any")
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
    assert not layers._write_fused(k, k, kc, vc, pos) and (kc == 0).all()
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: False)
    assert layers._write_fused(k, k, kc, vc, pos) and (kc[:, :, 1] == 1).all() and (vc[:, :, 1] == 1).all()


def test_cached_decoding_through_the_fused_writes_gives_the_same_logits(monkeypatch):
    """A compiled model with a full layer (linear cache) and sparse layers (SWA rings), prefill then single tokens
    and an extend chunk longer than the window: the fused writes, counted, give the scatters' logits exactly."""
    import hysparse_compile as hs
    from models import build
    from test_decode import _ids, cached_logits

    # built and compiled on the device it runs on (a graph captured on the CPU keeps the CPU in its asserts)
    schedule = hs.Schedule.from_pattern("FSSF", block_size=16, topk=32, window=16)
    c = hs.compile(build("llama-sdpa", layers=4).to(DEV), schedule,
                   gate_init=lambda w: torch.nn.init.normal_(w, std=0.2), sink_init=0.5)
    ids = _ids(2, 60).to(DEV)
    chunks = (23, 1, 1, 5, 1, 20, 1, 1, 6, 1)
    monkeypatch.setattr(layers, "FUSED_WRITES", "off")
    with torch.no_grad():
        want, want_cache = cached_logits(c, ids, chunks=chunks)
        calls = []
        real = cache_write.write_kv
        monkeypatch.setattr(layers, "FUSED_WRITES", "any")
        monkeypatch.setattr(cache_write, "write_kv", lambda *a, **kw: (calls.append(kw.get("ring")), real(*a, **kw)))
        got, cache = cached_logits(c, ids, chunks=chunks)
    assert torch.equal(got, want)
    for a, b in zip(cache.keys + cache.values, want_cache.keys + want_cache.values):
        assert torch.equal(a, b)
    writes = len(chunks) - 1  # every call after the prefill, every layer
    assert calls.count(None) == 2 * writes and len(calls) == 4 * writes, calls
