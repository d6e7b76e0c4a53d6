"""bench/check_gpu.py's variant flags: they set the Triton kernels' module defaults (so every op call, the
backward's recomputation included, runs the variant), name the variant in every check's tag, and report a
descriptor kernel that fell back to pointer loads."""
import argparse
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: `bench` is a package there
from bench import check_gpu  # noqa: E402
from hysparse_compile.kernels.triton import full_attention as fa  # noqa: E402
from hysparse_compile.kernels.triton import sparse_attention as tsa  # noqa: E402


@pytest.fixture
def clean(monkeypatch):
    monkeypatch.setattr(fa, "FWD_CONFIG", dict(fa.FWD_CONFIG))
    monkeypatch.setattr(tsa, "BLOCK_COMBINE", tsa.BLOCK_COMBINE)
    monkeypatch.setattr(tsa, "TOKEN_TMA", tsa.TOKEN_TMA)
    monkeypatch.setattr(tsa, "TOKEN_TMA_TIMED", tsa.TOKEN_TMA_TIMED)
    monkeypatch.setattr(fa, "TMA_FAILED", {})
    monkeypatch.setattr(tsa, "TMA_FAILED", {})
    monkeypatch.setattr(check_gpu, "PARAMS", {})


def test_variant_flags_set_the_kernel_defaults_and_the_tags(clean):
    check_gpu.kernel_options(argparse.Namespace(full_fwd="tma2d_acc_64x64_w4_s3", combine="fused", token_tma="2d"))
    assert fa.FWD_CONFIG["tma"] == "2d" and fa.FWD_CONFIG["acc_dot"] and fa.FWD_CONFIG["BLOCK_M"] == 64
    assert tsa.BLOCK_COMBINE == "fused" and tsa.TOKEN_TMA == "2d" and tsa.token_tma(16, 16) == "2d"  # any size
    assert check_gpu.tag("full.out") == "full.out[tma2d_acc_64x64_w4_s3,combine=fused,token-tma=2d]"
    assert check_gpu.descriptor_fallbacks() == {}
    tsa.TMA_FAILED[("cuda:0", "bf16", 128)] = "CompilationError: ..."
    assert check_gpu.descriptor_fallbacks() == {"sparse": {"('cuda:0', 'bf16', 128)": "CompilationError: ..."}}


def test_the_previous_defaults_are_one_flag_each(clean):
    """The defaults are descriptor loads now; `--full-fwd ptr_64x64_w4_s3 --token-tma off` must undo every option
    (a variant that named only its tiles would keep the default's tma / ws and time something else)."""
    assert fa.FWD_CONFIG["tma"] and fa.FWD_CONFIG["ws"] and tsa.TOKEN_TMA
    check_gpu.kernel_options(argparse.Namespace(full_fwd="ptr_64x64_w4_s3", combine=None, token_tma="off"))
    assert fa.FWD_CONFIG == {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "tma": False,
                             "acc_dot": False, "ws": False}
    assert tsa.TOKEN_TMA is False


def test_without_flags_nothing_changes(clean):
    before = (dict(fa.FWD_CONFIG), tsa.BLOCK_COMBINE, tsa.TOKEN_TMA)
    check_gpu.kernel_options(argparse.Namespace(full_fwd=None, combine=None, token_tma=None))
    assert (fa.FWD_CONFIG, tsa.BLOCK_COMBINE, tsa.TOKEN_TMA) == before and check_gpu.tag("x") == "x"
    fa.TMA_FAILED["k"] = "why"  # a fallback without a requested variant is not this run's business
    assert check_gpu.descriptor_fallbacks() == {}


def test_unknown_full_forward_variant_is_named(clean):
    with pytest.raises(SystemExit, match="--full-fwd 'fast': choose from ptr_64x64_w4_s3"):
        check_gpu.kernel_options(argparse.Namespace(full_fwd="fast", combine=None, token_tma=None))
