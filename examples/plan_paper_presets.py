"""KV cache plans for the paper's two presets at 32k and 128k context, and what fits in 80 GB of KV cache.

Run: python examples/plan_paper_presets.py

The model shapes are the paper's (Table 1): 7B dense with 8 KV heads, 80B-A3B MoE with 4 KV heads, head dim 128,
bf16 cache. "80 GB" is the H100's 80 * 10**9 bytes, all of it given to the KV cache (weights not subtracted).
"""
from rich.console import Console
from rich.table import Table

from hysparse_compile.kv_plan import format_bytes, plan_kv
from hysparse_compile.schedule import Schedule

BUDGET = 80 * 10**9
MODELS = {"hysparse-7b": 8, "hysparse-80b-a3b": 4}  # preset -> KV heads

console = Console(highlight=False, width=140)
table = Table(title="HySparse KV cache vs full attention (bf16, head dim 128, batch 1)")
for column in ("preset", "context", "HySparse", "full attention", "smaller by",
               "max batch in 80 GB (HySparse / full)", "max context in 80 GB (HySparse / full)"):
    table.add_column(column, justify="left" if column == "preset" else "right")
for preset, kv_heads in MODELS.items():
    schedule = Schedule.preset(preset)
    for seq_len in (32 * 1024, 128 * 1024):
        plan = plan_kv(schedule, num_kv_heads=kv_heads, head_dim=128, batch=1, seq_len=seq_len, dtype="bfloat16")
        table.add_row(preset, f"{seq_len // 1024}k", format_bytes(plan.total_bytes),
                      format_bytes(plan.baseline_bytes), f"{plan.ratio:.2f}x",
                      f"{plan.max_batch(BUDGET)} / {plan.max_batch(BUDGET, baseline=True)}",
                      f"{plan.max_seq_len(BUDGET)} / {plan.max_seq_len(BUDGET, baseline=True)}")
console.print(table)

# The per-layer view of one of them: which layer keeps what.
plan = plan_kv(Schedule.preset("hysparse-80b-a3b"), num_kv_heads=4, head_dim=128, batch=1, seq_len=32768,
               dtype="bfloat16")
assert plan.total_bytes == 5 * 2048 * 32768 + 44 * 2048 * 128  # 5 full caches + 44 SWA ring buffers of 128 tokens
console.print(plan.summary())
