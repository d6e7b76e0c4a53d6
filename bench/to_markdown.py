"""Render a bench_kernels.py JSON result as the Markdown tables of docs/benchmarks.md.

    python -m bench.to_markdown bench/results/h100_2026-11-23.json > /tmp/tables.md
"""
from __future__ import annotations

import json
import sys


def _ms(x):
    return "" if x is None else (f"{x:.3f}" if x < 10 else f"{x:.1f}")


def prefill_tables(rows, mode: str) -> str:
    pre = [r for r in rows if r.get("section") == "prefill" and r.get("mode") == mode and r.get("ms")]
    ops = [op for op in ("sdpa_cudnn", "sdpa_flash", "flex_causal", "full[triton]", "full[flex]",
                         "sparse[triton]/tile", "sparse[triton]/real", "sparse[triton]/random", "nsa[fla]/tile",
                         "nsa[fla]/random", "sparse[flex]/tile", "sparse[flex]/random")
           if any(r["op"] == op for r in pre)]
    out = []
    for shape in sorted({r["shape"] for r in pre}):
        Ts = sorted({r["T"] for r in pre if r["shape"] == shape})
        out.append(f"\n**{shape}, {mode}** — ms, and in brackets how many times faster than SDPA cuDNN "
                   f"(< 1 = slower)\n")
        out.append("| op | " + " | ".join(f"T={T // 1024}k" for T in Ts) + " |")
        out.append("|---|" + "---|" * len(Ts))
        for op in ops:
            cells = []
            for T in Ts:
                r = next((r for r in pre if r["shape"] == shape and r["T"] == T and r["op"] == op), None)
                if r is None:
                    cells.append("")
                elif op == "sdpa_cudnn":
                    cells.append(_ms(r["ms"]))
                else:
                    cells.append(f"{_ms(r['ms'])} ({r['speedup']:.2f}×)")
            if any(cells):
                out.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def decode_table(rows) -> str:
    dec = [r for r in rows if r.get("section") == "decode" and r.get("ms")]
    out = ["| shape | cache | B | op | ms | vs SDPA decode | GB/s | of copy bw | must read (MB) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in dec:
        speed = "" if r["op"] == "sdpa_decode" else f"{r.get('speedup', 0):.2f}×"
        mb = "" if r.get("bytes") is None else f"{r['bytes'] / 1e6:.2f}"
        out.append(f"| {r['shape']} | {r['T'] // 1024}k | {r.get('B', '')} | {r['op']} | {_ms(r['ms'])} | {speed} | "
                   f"{r.get('GBps', 0):.0f} | {r.get('bw_vs_copy', 0):.2f} | {mb} |")
    return "\n".join(out)


def stack_table(rows) -> str:
    st = [r for r in rows if r.get("section") == "stack" and r.get("ms")]
    out = ["| op | ms | vs 36 × cuDNN |", "|---|---|---|"]
    for r in st:
        speed = "" if r.get("speedup") is None else f"{r['speedup']:.2f}×"
        out.append(f"| {r['op']} | {_ms(r['ms'])} | {speed} |")
    return "\n".join(out)


def main(path: str) -> None:
    data = json.load(open(path))
    rows = data["rows"]
    print(prefill_tables(rows, "fwd"))
    print(prefill_tables(rows, "fwd+bwd"))
    print("\n**Decode** (one token, bf16)\n")
    print(decode_table(rows))
    print("\n**Stack** (`Schedule.hybrid(36, 3)`: 10 full + 26 sparse layers' attention, 32/8/128, T = 32k)\n")
    print(stack_table(rows))


if __name__ == "__main__":
    main(sys.argv[1])
