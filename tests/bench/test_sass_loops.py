"""bench/sass_loops.py: loops found in a SASS listing, and (where Triton's sm_90 tools are installed) the full
forward compiled for sm_90 on this machine."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import sass_loops
from bench.sass_loops import loops, opcode, variants

ROOT = Path(__file__).resolve().parents[2]

LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0020*/              @!P0 FSEL R2, R3, -INF , P1 ;
        /*0030*/                   MUFU.EX2 R4, R5 ;
        /*0040*/              @P2  BRA `(.L_x_0) ;
.L_x_1:
        /*0050*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0060*/                   FSETP.GT.AND P0, PT, R2, R3, PT ;
        /*0070*/                   FSEL R2, R3, -INF , P0 ;
        /*0080*/                   SHFL.BFLY PT, R6, R7, 0x1, 0x1f ;
        /*0090*/                   MUFU.EX2 R4, R5 ;
        /*00a0*/              @P3  BRA `(.L_x_1) ;
.L_x_2:
        /*00b0*/                   FADD R1, R1, R1 ;
        /*00c0*/                   BRA `(.L_x_2) ;
.L_x_3:
        /*00d0*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
.L_x_4:
        /*00e0*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*00f0*/              @P1  BRA `(.L_x_4) ;
        /*0100*/              @P2  BRA `(.L_x_3) ;
        /*0110*/                   EXIT ;
"""


def test_loops_are_found_and_the_hot_one_is_innermost_shortest_with_the_most_mma():
    found = loops(LISTING)
    assert [f["label"] for f in found] == ["L_x_4", "L_x_0", "L_x_1", "L_x_2", "L_x_3"]
    assert found[0]["ops"] == {"HGMMA": 1, "BRA": 1} and found[0]["inner"]
    assert found[1]["instructions"] == 4 and found[1]["ops"] == {"HGMMA": 1, "FSEL": 1, "MUFU": 1, "BRA": 1}
    assert found[2]["ops"]["SHFL"] == 1 and found[3]["ops"] == {"FADD": 1, "BRA": 1}
    outer = found[-1]  # holds L_x_4: not one iteration, last despite its 2 HGMMA
    assert outer["label"] == "L_x_3" and not outer["inner"] and outer["ops"]["HGMMA"] == 2


def test_an_opcode_drops_its_predicate_and_modifiers():
    assert opcode("@!P0 FSEL.FTZ R1, R2, R3, P1") == "FSEL"
    assert opcode("HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24") == "HGMMA"


def test_a_variant_that_is_not_one_is_named():
    assert variants("sel1_tma2_ws0, sel0_tma0_ws1,partials_r0 , grads") == [
        "sel1_tma2_ws0", "sel0_tma0_ws1", "partials_r0", "grads"]
    for bad in ("sel1_tma4_ws0", "partials_168", "grad"):
        with pytest.raises(ValueError, match=f"'{bad}'.*sel<0\\|1>_tma<0\\|2>_ws<0\\|1>.*partials / grads"):
            variants(bad)


@pytest.mark.skipif(not Path(sass_loops._tool("nvdisasm")).is_file(),
                    reason="Triton's NVIDIA tools (ptxas, nvdisasm) are not installed here")
def test_the_selection_adds_work_to_the_full_forwards_key_loop(tmp_path):
    """Compiled for sm_90 on the CPU (in a process without TRITON_INTERPRET, which the suite sets): the off-diagonal
    loop keeps its 12 tensor-core MMAs per 64-key block with the running top-k on, and the list update adds
    instructions (compares, selects, shuffles); a second run compares equal to the saved SASS."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "bench.sass_loops", "--variants", "sel0_tma0_ws0,sel1_tma0_ws0"]
    subprocess.run(cmd + ["--save", str(tmp_path)], env=env, check=True, capture_output=True, cwd=ROOT)
    hot = {s: loops((tmp_path / f"sel{s}_tma0_ws0.sass").read_text())[0] for s in (0, 1)}
    assert hot[0]["ops"]["HGMMA"] == hot[1]["ops"]["HGMMA"] == 12
    assert hot[1]["instructions"] > hot[0]["instructions"]
    assert hot[1]["ops"].get("SHFL", 0) > hot[0]["ops"].get("SHFL", 0)
    again = subprocess.run(cmd + ["--diff", str(tmp_path)], env=env, check=True, capture_output=True, text=True,
                           cwd=ROOT).stdout
    assert again.count("identical") == 2


def test_it_refuses_to_run_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "bench.sass_loops"], env=env, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "TRITON_INTERPRET=1" in r.stderr


@pytest.mark.skipif(not Path(sass_loops._tool("nvdisasm")).is_file(),
                    reason="Triton's NVIDIA tools (ptxas, nvdisasm) are not installed here")
def test_the_block_major_steps_keep_their_integer_work_small(tmp_path):
    """The block-major kernels' 64-row step (docs/kernels_sparse.md, "Integer work per step"): 12 MMAs in the
    partials kernel, 28 in the gradients kernel; no signed division (nsel is a constexpr), and the partials' hottest
    step has no per-score causal mask (fewer selects than the 32 scores a thread holds); the launch's register cap
    holds."""
    from hysparse_compile.kernels.triton import block_major

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "bench.sass_loops", "--variants", "partials_r0,partials,grads", "--save",
           str(tmp_path)]
    subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=ROOT)
    hot = {t: loops((tmp_path / f"{t}.sass").read_text())[0] for t in ("partials_r0", "partials", "grads")}
    assert hot["partials_r0"]["ops"]["HGMMA"] == hot["partials"]["ops"]["HGMMA"] == 12
    assert hot["grads"]["ops"]["HGMMA"] == 28
    for h in hot.values():
        assert h["ops"].get("IABS", 0) == 0
    assert hot["partials_r0"]["ops"].get("FSEL", 0) < 32
    res = subprocess.run([sass_loops._tool("cuobjdump"), "-res-usage", str(tmp_path / "partials.cubin")],
                         capture_output=True, text=True).stdout
    assert int(re.search(r"REG:(\d+)", res).group(1)) <= block_major.PARTIALS_MAXNREG
