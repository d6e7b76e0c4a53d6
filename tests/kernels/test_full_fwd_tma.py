"""The full layer's forward with K/V through tensor descriptors (`tma`) and the accumulate-form P @ V (`acc_dot`).

Both are options of `full_attention.FWD_CONFIG` (on by default since the H100 run of 2026-12-06,
bench/full_fwd_variants.py, with the warp-specialized loop and 128-row tiles). Each variant must give the pointer
kernel's result: against the float64 reference (out, lse, block scores, selection) at odd sizes, GQA groups
1/4/16, batch 2, sinks, softcap, the model's transposed layout, and the extend launch (cache rows past the filled
length hold garbage). Runs on CUDA, or on CPU under TRITON_INTERPRET=1 (the interpreter
implements tensor descriptors, zero-filling rows past the tensor as the bulk copy does).
"""

import importlib
import os
import warnings

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from hysparse_compile.kernels import reference  # noqa: E402
from hysparse_compile.kernels.triton import common  # noqa: E402
from hysparse_compile.kernels.triton import full_attention as fa  # noqa: E402
from hysparse_compile.kernels.triton.full_attention_extend import full_attention_extend  # noqa: E402

# the module, not the function of the same name the package exports
fa_ext = importlib.import_module("hysparse_compile.kernels.triton.full_attention_extend")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
VARIANTS = {"tma+acc_dot": dict(tma=True, acc_dot=True), "tma": dict(tma=True), "acc_dot": dict(acc_dot=True),
            "tma2d+acc_dot": dict(tma="2d", acc_dot=True),  # 2-D: contiguous K/V (mode 2), the model's layout (3)
            "tma2d+acc_dot+ws": dict(tma="2d", acc_dot=True, ws=True)}  # the interpreter runs the loop plainly
if common.TensorDescriptor is None:  # a Triton without host-side descriptors: only the accumulate form can run
    VARIANTS = {"acc_dot": dict(acc_dot=True)}


def use_config(monkeypatch, block_n=32, **opts):
    """Tiles with BLOCK_N = 32 over 16-key blocks (the sub-block path GPUs run), plus the variant's options; on a
    GPU the tuned tiles with the options. No remembered descriptor failure: a variant that fails must fail here."""
    monkeypatch.setattr(fa, "TMA_FAILED", {})
    if fa.INTERPRET:
        cfg = {"BLOCK_M": 64, "BLOCK_N": block_n, "num_warps": 4, "num_stages": 1}
        monkeypatch.setattr(fa, "INTERPRET_FWD_CONFIG", {**cfg, **opts})
    else:
        monkeypatch.setattr(fa, "FWD_CONFIG", {**fa.FWD_CONFIG, **opts})


def qkv(B, Hq, Hkv, T, d, dtype, seed, transposed=False):
    g = torch.Generator().manual_seed(seed)
    if transposed:  # the model's layout: [B, T, H, d] memory viewed as [B, H, T, d]
        return tuple(torch.randn(B, T, h, d, generator=g).to(DEV, dtype).transpose(1, 2) for h in (Hq, Hkv, Hkv))
    return tuple(torch.randn(B, h, T, d, generator=g).to(DEV, dtype) for h in (Hq, Hkv, Hkv))


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run(q, k, v, bs, topk, scale, **kw):
    return fa.full_attention_fwd(q, k, v, bs, topk, scale, True, **kw)


CASES = {  # name: (B, Hq, Hkv, T, d, block, topk, options)
    "g4_T37": (2, 4, 1, 37, 16, 16, 32, {}),
    "g1_T50_sinks": (1, 2, 2, 50, 16, 16, 48, {"sinks": True}),
    "g16_T21_softcap": (1, 16, 1, 21, 32, 16, 32, {"softcap": 5.0}),
    "g4_T70_transposed": (2, 8, 2, 70, 16, 16, 48, {"transposed": True}),
}


# Each option alone (the combinations cover it) and the warp-specialized loop (the interpreter runs it as the plain
# one) run on one case by default, on every case with --full.
SAMPLED = ("tma", "acc_dot", "tma2d+acc_dot+ws")
GRID = [pytest.param(c, v, marks=pytest.mark.full_grid) if v in SAMPLED and c != "g4_T70_transposed" else (c, v)
        for v in VARIANTS for c in CASES]


@pytest.mark.parametrize("case,variant", GRID)
def test_variant_matches_reference_and_pointer_kernel(monkeypatch, variant, case):
    B, Hq, Hkv, T, d, bs, topk, opt = CASES[case]
    q, k, v = qkv(B, Hq, Hkv, T, d, torch.float32, seed=len(case), transposed=opt.get("transposed", False))
    kw = {}
    if opt.get("sinks"):
        kw["sinks"] = torch.randn(Hq, generator=torch.Generator().manual_seed(3)).to(DEV)
    if opt.get("softcap"):
        kw["softcap"] = opt["softcap"]
    scale = d ** -0.5
    use_config(monkeypatch)
    base = run(q, k, v, bs, topk, scale, **kw)
    use_config(monkeypatch, **VARIANTS[variant])
    got = run(q, k, v, bs, topk, scale, **kw)
    ref = reference.full_attention_fwd(q.double(), k.double(), v.double(), bs, topk, scale, True,
                                       **{n: (x.double() if torch.is_tensor(x) else x) for n, x in kw.items()})
    out, idx, lse, scores = got
    assert not fa.TMA_FAILED, fa.TMA_FAILED
    assert rel(out, ref[0]) < 2e-5 and (lse.double() - ref[2]).abs().max() < 1e-4
    assert torch.allclose(scores.double(), ref[3].double(), rtol=1e-5, atol=1e-7)
    assert torch.equal(idx, ref[1].to(idx.dtype))
    assert torch.equal(idx, base[1]) and rel(out, base[0]) < 1e-6 and (lse - base[2]).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_variant_matches_pointer_kernel(monkeypatch, dtype):
    q, k, v = qkv(1, 8, 2, 45, 32, dtype, seed=9)
    use_config(monkeypatch)
    base = run(q, k, v, 16, 32, 0.2)
    use_config(monkeypatch, tma=common.TensorDescriptor is not None, acc_dot=True)
    out, idx, lse, _ = run(q, k, v, 16, 32, 0.2)
    assert not fa.TMA_FAILED, fa.TMA_FAILED
    ref = reference.full_attention_fwd(q.double(), k.double(), v.double(), 16, 32, 0.2, False)
    assert out.dtype == dtype and rel(out, ref[0]) < (2e-3 if dtype == torch.float16 else 1e-2)
    assert rel(out, base[0]) < (1e-3 if dtype == torch.float16 else 8e-3)
    assert (idx == base[1]).float().mean() > 0.98


@pytest.mark.skipif(common.TensorDescriptor is None, reason="this Triton has no host-side tensor descriptors")
def test_extend_through_descriptors_ignores_the_cache_past_the_filled_rows(monkeypatch):
    """Cache rows past start[b] + R hold garbage (inf keys, NaN values): the descriptor loads read whole BLOCK_N
    tiles, so the kernel, not the load, must keep them out (the reference sees the clean cache)."""
    B, Hq, Hkv, S, d, R = 2, 4, 1, 64, 16, 9
    q, kc, vc = qkv(B, Hq, Hkv, S, d, torch.float32, seed=4)
    q = q[:, :, :R].contiguous()
    start = torch.tensor([20, 41], dtype=torch.int32, device=DEV)
    r_out, r_idx = reference.full_attention_extend(q.double(), kc.double(), vc.double(), start, 16, 32, 0.25)
    for b, s in enumerate(start.tolist()):
        kc[b, :, s + R:] = float("inf")
        vc[b, :, s + R:] = float("nan")
    monkeypatch.setattr(fa_ext, "EXTEND_DESCRIPTORS_MIN_ROWS", 1)
    for tma in (True, "2d"):  # 2-D: a head's rows past start + R run on into its unwritten rows
        use_config(monkeypatch, tma=tma, acc_dot=True)
        out, idx = full_attention_extend(q, kc, vc, start, 16, 32, 0.25)
        assert not fa.TMA_FAILED, fa.TMA_FAILED
        assert torch.isfinite(out).all() and rel(out, r_out) < 2e-5
        assert torch.equal(idx, r_idx.to(idx.dtype))


@pytest.mark.skipif(common.TensorDescriptor is None, reason="this Triton has no host-side tensor descriptors")
def test_descriptor_failure_falls_back_to_pointer_loads_once(monkeypatch):
    def refuse(*a, **k):
        raise ValueError("no bulk copies here")

    q, k, v = qkv(1, 4, 1, 30, 16, torch.float32, seed=2)
    use_config(monkeypatch)
    base = run(q, k, v, 16, 32, 0.25)
    monkeypatch.setattr(fa, "TMA_FAILED", {})
    monkeypatch.setattr(common, "TensorDescriptor", refuse)
    use_config(monkeypatch, tma=True)
    with pytest.warns(RuntimeWarning, match="full layer's forward with tensor descriptors failed"):
        got = run(q, k, v, 16, 32, 0.25)
    assert torch.equal(got[0], base[0]) and torch.equal(got[1], base[1])
    assert list(fa.TMA_FAILED.values()) == ["ValueError: no bulk copies here"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert torch.equal(run(q, k, v, 16, 32, 0.25)[0], base[0])
    assert not [w for w in seen if "hysparse" in str(w.message)], "remembered: no second try, no second warning"


def test_a_failure_is_remembered_per_tiles_not_per_head_dim(monkeypatch):
    """A descriptor build that failed for one set of tiles sends those tiles to pointer loads, not every forward of
    the same device, dtype and head dim (extend's shorter tiles, a tuned variant)."""
    real, built = common.TensorDescriptor, []

    def refuse(*a, **k):
        raise ValueError("no bulk copies here")

    def counting(*a, **k):
        built.append(a[1])
        return real(*a, **k)

    q, k, v = qkv(1, 4, 1, 30, 16, torch.float32, seed=2)
    use_config(monkeypatch, tma=True)
    monkeypatch.setattr(common, "TensorDescriptor", refuse)
    with pytest.warns(RuntimeWarning, match="failed"):
        run(q, k, v, 16, 32, 0.25)
    assert len(fa.TMA_FAILED) == 1
    monkeypatch.setattr(common, "TensorDescriptor", counting)
    run(q, k, v, 16, 32, 0.25)
    assert built == [], "the failed tiles are remembered: no second try"
    failed = dict(fa.TMA_FAILED)
    use_config(monkeypatch, block_n=16, tma=True)  # other tiles: descriptors are tried (and build) there
    monkeypatch.setattr(fa, "TMA_FAILED", failed)
    want = run(q, k, v, 16, 32, 0.25)
    assert len(built) == 2 and len(fa.TMA_FAILED) == 1  # K and V
    monkeypatch.setattr(common, "TensorDescriptor", real)
    use_config(monkeypatch, block_n=16)
    assert torch.equal(run(q, k, v, 16, 32, 0.25)[0], want[0])


def test_a_descriptor_config_without_descriptors_runs_the_pointer_tiles(monkeypatch):
    """FWD_CONFIG's 128-row tiles are tuned for descriptor loads; where they cannot run (here: under a wrap, as
    AOTInductor's wrap_triton launches) the pointer kernel gets POINTER_FWD_CONFIG's tiles, and the same result."""
    launched = []

    def recording(kernel):
        class Grid:
            def __getitem__(self, grid):
                def call(*args, **kw):
                    launched.append((grid, kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["TMA"]))
                    return kernel[grid](*args, **kw)
                return call
        return Grid()

    q, k, v = qkv(1, 4, 1, 150, 16, torch.float32, seed=4)
    cfg = {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 1, "tma": "2d", "acc_dot": True}
    got = fa.launch_forward(q, k, v, None, 16, 32, 0.25, wrap=recording, cfg=cfg)
    p = fa.POINTER_FWD_CONFIG
    assert launched == [((3, 4), p["BLOCK_M"], p["BLOCK_N"], p["num_warps"], 0)]  # ceil(150 / 64) row tiles
    want = fa.launch_forward(q, k, v, None, 16, 32, 0.25, cfg=dict(p))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_descriptor_tiles_only_where_they_were_timed(monkeypatch):
    """FWD_CONFIG (128-row descriptor tiles) runs at the (block, head dim) it was timed at; elsewhere the pointer
    tiles, the default before it (BLOCK_N stretched to the block)."""
    monkeypatch.setattr(fa, "FWD_CONFIG", {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3,
                                           "tma": "2d", "acc_dot": True, "ws": True})
    monkeypatch.setattr(fa, "DESCRIPTORS_TIMED", {(64, 128)})
    assert fa.tuned_config(64, 128) == fa.FWD_CONFIG
    assert fa.tuned_config(64, 64) == fa.POINTER_FWD_CONFIG
    assert fa.tuned_config(128, 128) == {**fa.POINTER_FWD_CONFIG, "BLOCK_M": 128, "BLOCK_N": 128}
    monkeypatch.setattr(fa, "FWD_CONFIG", dict(fa.POINTER_FWD_CONFIG, tma=False))  # no descriptors asked: as given
    assert fa.tuned_config(128, 64)["BLOCK_N"] == 128 and fa.tuned_config(32, 64)["BLOCK_M"] == 64


def test_extend_takes_the_descriptor_tiles_only_from_512_rows(monkeypatch):
    """FWD_CONFIG asks for descriptors and 128-row tiles; extend takes them from EXTEND_DESCRIPTORS_MIN_ROWS (512)
    new rows, where they were faster, and keeps the pointer tiles (query tiles cut to the rows) below."""
    monkeypatch.setattr(fa, "INTERPRET_FWD_CONFIG", {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3,
                                                     "tma": "2d", "acc_dot": True, "ws": True})
    assert fa_ext.extend_config(64, 128, 511) == fa.POINTER_FWD_CONFIG
    assert fa_ext.extend_config(64, 128, 8) == {**fa.POINTER_FWD_CONFIG, "BLOCK_M": 16}
    assert fa_ext.extend_config(64, 128, 512) == fa.INTERPRET_FWD_CONFIG
    monkeypatch.setattr(fa_ext, "EXTEND_DESCRIPTORS_MIN_ROWS", 1)
    assert fa_ext.extend_config(64, 128, 512)["tma"] == "2d" and fa_ext.extend_config(64, 128, 8)["BLOCK_M"] == 16


def test_tma_modes_follow_the_layout():
    k = torch.randn(2, 3, 40, 16, device=DEV, dtype=torch.float16)
    km = torch.randn(2, 40, 3, 16, device=DEV, dtype=torch.float16).transpose(1, 2)  # the model's layout
    if common.TensorDescriptor is None or not common.tma_ok(k):
        assert fa.tma_mode("2d", k, k) == 0
        return
    assert fa.tma_mode(False, k, k) == 0 and fa.tma_mode(True, k, k) == 1
    assert fa.tma_mode("2d", k, k) == 2 and fa.tma_mode("2d", km, km) == 3 and fa.tma_mode("2d", k, km) == 1
    assert fa.tma_mode("2d", k[:, :, ::2], k[:, :, ::2]) == 1  # strided rows: 4-D only


def test_descriptors_only_where_the_bulk_copy_can_address_the_tensor():
    x = torch.randn(2, 3, 40, 16, device=DEV, dtype=torch.float16)
    wide = torch.randn(2, 3, 40, 20, device=DEV, dtype=torch.float16)[..., :16]  # rows 40 bytes apart
    expanded = torch.randn(1, 3, 40, 16, device=DEV, dtype=torch.float16).expand(2, -1, -1, -1)
    if common.TensorDescriptor is None or not (fa.INTERPRET or torch.cuda.get_device_capability()[0] >= 9):
        assert not common.tma_ok(x)
        return
    assert common.tma_ok(x) and common.tma_ok(x.transpose(1, 2).contiguous().transpose(1, 2))
    assert not common.tma_ok(wide) and not common.tma_ok(expanded) and not common.tma_ok(x, wide)
    flat = torch.randn(x.numel() + 8, device=DEV, dtype=torch.float16)
    assert common.tma_ok(flat[8:].view(2, 3, 40, 16)) and not common.tma_ok(flat[1:1 + x.numel()].view(2, 3, 40, 16))


@pytest.mark.skipif(common.TensorDescriptor is None, reason="this Triton has no host-side tensor descriptors")
def test_2d_descriptors_keep_a_nan_in_the_next_head_out(monkeypatch):
    """Contiguous K/V as [B * Hkv * T, d]: KV head 0's last tile (T not a multiple of BLOCK_N) runs on into head 1's
    rows; a NaN there must not reach head 0's outputs or selection."""
    q, k, v = qkv(2, 4, 2, 45, 16, torch.float32, seed=11)
    k[:, 1], v[:, 1] = float("nan"), float("nan")
    use_config(monkeypatch)
    base = run(q, k, v, 16, 32, 0.25)
    use_config(monkeypatch, tma="2d")
    assert fa.tma_mode("2d", k, v) == 2
    out, idx, lse, _ = run(q, k, v, 16, 32, 0.25)
    assert not fa.TMA_FAILED
    assert torch.isfinite(out[:, :2]).all() and torch.equal(out[:, :2], base[0][:, :2])  # query heads of KV head 0
    assert torch.equal(idx[:, 0], base[1][:, 0]) and torch.equal(lse[:, :2], base[2][:, :2])
