"""The full forward's (or the block-major sparse kernels') machine code for sm_90, compiled on this machine (no GPU
needed): registers, stack, and what one iteration of its hottest loop executes, per variant; or whether two trees
compile to the same SASS.

    python -m bench.sass_loops                                   # selection off / on, pointer and 2-D descriptors
    python -m bench.sass_loops --save /tmp/before                # keep each variant's SASS ...
    python -m bench.sass_loops --diff /tmp/before                # ... and after a change, compare with it
    python -m bench.sass_loops --variants partials_r0,partials,grads   # block-major partials (no register cap,
                                                                 # the launch's cap) and gradients, 32/8/128

Triton compiles for `GPUTarget("cuda", 90, 32)` and ptxas (bundled with Triton) assembles; `nvdisasm` prints the
SASS, whose branches name their labels. A loop is the span from a label to a branch back to it; the hottest is the
innermost one with the most HGMMA (tensor-core) instructions and, among those, the shortest: the off-diagonal key
loop (read its HGMMA count: 12 per 64-key block at these tiles). The counts are static, not a timing, and the local
Triton may differ from the GPU machine's (Triton 3.9 here emits the same SASS with and without `warp_specialize`,
3.6 on the H100 does not): use it to check that a refactor leaves the code alone, and to count what a change adds
to the loop, then time the change on the GPU. Used in the ninth session of 2026-12-06
(docs/benchmarks.md, "Ninth session", call l), and for the block-major kernels in the eleventh
(docs/kernels_sparse.md, "Integer work per step, and registers"; their hottest loop is one step of 64 query rows
against a key block: 12 HGMMA in the partials kernel, 28 in the gradients kernel).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
from pathlib import Path

# opcodes worth a column: tensor-core MMA, special-function (exp2), float / int min-max, selects, compares, shuffles,
# barriers, local-memory loads and stores (register spills inside the loop), integer absolute values (what a signed
# division by a runtime value compiles to)
COLUMNS = ("HGMMA", "MUFU", "FMNMX", "VIMNMX", "FSEL", "SEL", "FSETP", "ISETP", "SHFL", "BAR", "LDL", "STL", "IABS")
_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*\.(L_x_\d+):")
_TARGET = re.compile(r"\bBRA\b.*?`?\(?\.(L_x_\d+)")


def opcode(instr: str) -> str:
    """`@!P0 FSEL.FTZ R1, ...` -> `FSEL` (predicate and modifiers dropped)."""
    return re.sub(r"^@!?U?P\w+\s+", "", instr).split()[0].split(".")[0]


def loops(sass: str) -> list[dict]:
    """Every loop of an `nvdisasm -c` listing (a label and a later branch back to it): dicts with `label`, `start`,
    `end` (instruction indices), `instructions`, `ops` (opcode -> count) and `inner` (no other loop inside it),
    hottest first: innermost, then most HGMMA, then shortest (the causal kernel's diagonal loop has the same MMAs as
    the off-diagonal one plus its masks, and runs once or twice per tile; a span that holds other loops, as the
    warp-specialized code has, is not one iteration)."""
    instr: list[str] = []
    labels: dict[str, int] = {}
    for line in sass.splitlines():
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = len(instr)
            continue
        m = _INSTR.match(line)
        if m:
            instr.append(m.group(2))
    found = []
    for i, text in enumerate(instr):
        m = _TARGET.search(text)
        if m and labels.get(m.group(1), i + 1) <= i:
            start = labels[m.group(1)]
            ops: dict[str, int] = {}
            for b in instr[start:i + 1]:
                ops[opcode(b)] = ops.get(opcode(b), 0) + 1
            found.append(dict(label=m.group(1), start=start, end=i, instructions=i + 1 - start, ops=ops))
    for f in found:
        f["inner"] = not any(g is not f and f["start"] <= g["start"] and g["end"] <= f["end"] for g in found)
    return sorted(found, key=lambda x: (not x["inner"], -x["ops"].get("HGMMA", 0), x["instructions"]))


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_full_forward(select: bool, tma: int, ws: bool, block_m: int = 128, block_n: int = 64, warps: int = 8,
                         stages: int = 3, head_dim: int = 128, nsel: int = 16):
    """`full_attention._fwd_kernel` compiled for sm_90 with the default's tiles (bf16, block 64, no sinks/softcap,
    the accumulate-form P @ V); tma 0 (pointer loads) or 2 (2-D descriptors)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hysparse_compile.kernels.triton import full_attention as fa

    if tma not in (0, 2):
        raise ValueError(f"sass_loops: tma={tma!r}; 0 (pointer loads) or 2 (2-D descriptors)")
    kv = f"tensordesc<bf16[{block_n},{head_dim}]>" if tma == 2 else "*bf16"
    # the kernel's own parameter list, typed: tensors by name, fp32 scalars by name, every other runtime one an i32
    tensors = dict(Q="*bf16", K=kv, V=kv, Out="*bf16", Lse="*fp32", CandS="*fp32", CandI="*i32", Sinks="*fp32",
                   Start="*fp32")
    const = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BS=64, NSEL=nsel,
                 NSEL_P2=triton.next_power_of_2(nsel), IEEE=False, SELECT=select, SOFTCAP=False, HAS_SINKS=False,
                 HAS_START=False, TMA=tma, ACC_DOT=True, WS=ws)
    params = fa._fwd_kernel.params
    sig = {p.name: "constexpr" if p.is_constexpr else tensors.get(p.name) or
           ("fp32" if p.name in ("qk_scale", "cap2") else "i32") for p in params}
    src = ASTSource(fn=fa._fwd_kernel, signature=sig,
                    constexprs={(i,): const[p.name] for i, p in enumerate(params) if p.is_constexpr})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


def compile_block_major(kind: str, maxnreg: int | None = None, G: int = 4, head_dim: int = 128, nsel: int = 16):
    """`block_major._block_partials_kernel` ("partials") or `_block_grads_kernel` ("grads") compiled for sm_90 as the
    32/8/128 model launches them (bf16, block 64, no softcap, int32 offsets, the launch's default tiles); pointers,
    strides and lengths carry Triton's divisibility-by-16 attribute, as a real launch specializes them (without it
    no load is vectorized). maxnreg: the partials kernel's cap as its launch takes it (`partials_maxnreg`: None the
    launch's default, 0 none); the gradients kernel's cap (None or 0: none)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hysparse_compile.kernels.triton import block_major as bm

    if kind == "partials":
        kern = bm._block_partials_kernel
        tok, block_m, chunk, warps, stages = bm.default_config(G, head_dim, 64)
        tensors = dict(OP="*bf16", LP="*fp32")
    else:
        kern = bm._block_grads_kernel
        tok, block_m, chunk, warps, stages = bm.grads_config(G, head_dim, 64)
        tensors = dict(DO="*bf16", L2="*fp32", DELTA="*fp32", DQ="*fp32", DK="*fp32", DV="*fp32")
    tensors.update(Q="*bf16", KS="*bf16", VS="*bf16", LIST="*i32", START="*i64", ITEM_BUCKET="*i32",
                   ITEM_CHUNK="*i32")
    const = dict(NSEL=nsel, G=G, TOK=tok, BLOCK_M=block_m, BLOCK_N=64, D=head_dim, CHUNK=chunk, SOFTCAP=False,
                 OFF64=False)
    aligned = set(tensors) | {"sqb", "sqh", "sqt", "sksb", "sksh", "skst", "svsb", "svsh", "svst", "T", "TC", "NB"}
    params = kern.params
    sig = {p.name: "constexpr" if p.is_constexpr else tensors.get(p.name) or
           ("fp32" if p.name in ("qk_scale2", "scale", "cap2") else "i32") for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if p.name in aligned}
    src = ASTSource(fn=kern, signature=sig, attrs=attrs,
                    constexprs={(i,): const[p.name] for i, p in enumerate(params) if p.is_constexpr})
    cap = bm.partials_maxnreg(warps, maxnreg) if kind == "partials" else maxnreg or None
    options = dict(num_warps=warps, num_stages=stages, **({"maxnreg": cap} if cap else {}))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def sass_of(kernel, workdir: Path, tag: str) -> tuple[str, dict]:
    """(SASS listing, {regs, stack}) of a compiled kernel, through its cubin."""
    cubin = workdir / f"{tag}.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    sass = subprocess.run([_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    usage = {k: int(m.group(1)) for k in ("REG", "STACK") if (m := re.search(rf"{k}:(\d+)", res))}
    return sass, usage


_FULL = re.compile(r"sel([01])_tma([02])_ws([01])")
_BLOCK = re.compile(r"(partials|grads)(?:_r(\d+))?")


def variants(spec: str) -> list[str]:
    """'sel0_tma0_ws0, partials_r0' -> ['sel0_tma0_ws0', 'partials_r0'], each checked: sel<0|1>_tma<0|2>_ws<0|1>
    (the full forward: selection, pointer loads or 2-D descriptors, warp specialization), or partials / grads with
    an optional _r<maxnreg> (the block-major sparse kernels; `partials` alone has the launch's cap,
    `block_major.PARTIALS_MAXNREG`, and _r0 none)."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        if not (_FULL.fullmatch(item) or _BLOCK.fullmatch(item)):
            raise ValueError(f"sass_loops: variant {item!r}; write sel<0|1>_tma<0|2>_ws<0|1> (the full forward) or "
                             "partials / grads, optionally with _r<maxnreg> (the block-major sparse kernels)")
        out.append(item)
    return out


def compile_variant(tag: str):
    """The compiled kernel of one `variants` tag."""
    m = _FULL.fullmatch(tag)
    if m:
        return compile_full_forward(m.group(1) == "1", int(m.group(2)), m.group(3) == "1")
    m = _BLOCK.fullmatch(tag)
    return compile_block_major(m.group(1), None if m.group(2) is None else int(m.group(2)))


def main(argv=None) -> None:
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="sel0_tma0_ws0,sel1_tma0_ws0,sel0_tma2_ws1,sel1_tma2_ws1")
    ap.add_argument("--save", default=None, help="write each variant's SASS to this folder")
    ap.add_argument("--diff", default=None, help="compare each variant's SASS with the one saved in this folder")
    args = ap.parse_args(argv)
    try:
        todo = variants(args.variants)
    except ValueError as e:
        ap.error(str(e))
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("TRITON_INTERPRET=1 makes the kernels Python functions: run without it to compile them")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    work = Path(args.save or os.environ.get("TMPDIR", "/tmp")) / ("" if args.save else "sass_loops")
    work.mkdir(parents=True, exist_ok=True)
    table = Table(title="sm_90 SASS (static counts; hottest loop = one key block per iteration, or one 64-row step "
                        "of a block-major kernel)")
    for col in ("variant", "regs", "stack", "loop instr") + COLUMNS + (("vs saved",) if args.diff else ()):
        table.add_column(col, justify="left" if col in ("variant", "vs saved") else "right")
    for tag in todo:
        sass, usage = sass_of(compile_variant(tag), work, tag)
        (work / f"{tag}.sass").write_text(sass)
        hot = (loops(sass) or [dict(instructions=0, ops={})])[0]
        row = [tag, str(usage.get("REG", "?")), str(usage.get("STACK", "?")), str(hot["instructions"])]
        row += [str(hot["ops"].get(c, 0)) for c in COLUMNS]
        if args.diff:
            old = Path(args.diff) / f"{tag}.sass"
            row.append("identical" if old.is_file() and old.read_text() == sass else
                       ("differs" if old.is_file() else "not saved"))
        table.add_row(*row)
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
