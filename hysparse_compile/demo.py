"""The project's main job on a built-in default, in under a minute on a laptop CPU (``hysparse-compile demo``).

1. Build a small HF Llama from a config (random weights, no downloads) and compile it with a 1:3 HySparse schedule.
2. Print what the compiler did: every layer's role and the K/V and index edges between layers.
3. Print the KV cache plan for the model's real shapes at a 32k context, against full attention everywhere.
4. Train the compiled model for 20 steps on a synthetic copy task and show the loss going down.
5. Generate with the KV cache: tokens/s and cache bytes of the compiled model against the original, and cached
   decoding checked against re-running the whole sequence. Exit code 1 if they differ.
6. Training-free exactness: compile a fresh copy with ``mode="training_free"`` and ``topk >= T`` (every block
   selected), and compare its logits with the original model's. Exit code 1 if they differ.

The tiny model builders here (``build_model``) are also what ``hysparse-compile inspect --model ...`` uses.
"""

from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hysparse_compile.kv_plan import plan_kv
from hysparse_compile.schedule import Schedule

VOCAB = 256
SEQ_LEN = 128  # tokens per training sequence: 8 blocks of 16
TASK_VOCAB = 32  # the copy task draws its tokens from the first 32 ids
EXACT_RTOL = 1e-4  # float32 training-free logits vs the original model's (max |diff| / max |ref|)


# ---------------------------------------------------------------------------------------------- tiny models
class NanoGPTAttention(nn.Module):
    """nanoGPT's CausalSelfAttention: fused qkv projection, ``F.scaled_dot_product_attention(is_causal=True)``."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(hidden, 3 * hidden)
        self.c_proj = nn.Linear(hidden, hidden)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # [B, H, T, d]
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # [B, H, T, d]
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # [B, H, T, d]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, d]
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class NanoGPTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(hidden), NanoGPTAttention(hidden, heads)
        self.ln_2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """A nanoGPT-style decoder: ``forward(input_ids [B, T]) -> logits [B, T, vocab]``."""

    def __init__(self, vocab: int = VOCAB, hidden: int = 128, layers: int = 8, heads: int = 4, max_pos: int = 512):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, hidden), nn.Embedding(max_pos, hidden)
        self.blocks = nn.ModuleList(NanoGPTBlock(hidden, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)  # [T]
        x = self.wte(input_ids) + self.wpe(pos)  # [B, T, hidden]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # [B, T, vocab]


def _llama_tiny() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def _gpt2_tiny() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_embd=128, n_layer=8, n_head=4, n_positions=512,
                        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, attn_implementation="sdpa")
    return GPT2LMHeadModel(config)


MODELS = {"llama-tiny": _llama_tiny, "gpt2-tiny": _gpt2_tiny, "nanogpt": NanoGPT}


def build_model(name: str, seed: int = 0) -> nn.Module:
    """A small built-in model with random weights (same ``seed``, same weights), in eval mode."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    torch.manual_seed(seed)
    return MODELS[name]().eval()


def num_attention_layers(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None:
        return config.num_hidden_layers
    return len(model.blocks)


def max_positions(model: nn.Module) -> int:
    """Positions the built-in model can embed."""
    config = getattr(model, "config", None)
    if config is not None:
        return getattr(config, "max_position_embeddings", None) or config.n_positions
    return model.wpe.num_embeddings


def logits_of(output) -> torch.Tensor:
    """Logits from a HF ``ModelOutput`` or a plain tensor."""
    return output.logits if hasattr(output, "logits") else output


def compile_and_inspect(model: nn.Module, schedule: Schedule, seq_len: int = SEQ_LEN):
    """Compile ``model`` with ``schedule`` (example input: ``[1, seq_len]`` token ids) and return the report."""
    import hysparse_compile as hc

    example = torch.randint(0, VOCAB, (1, seq_len), generator=torch.Generator().manual_seed(0))  # [1, T]
    compiled = hc.compile(model, schedule, example_inputs=(example,))
    return hc.inspect(compiled)


# ---------------------------------------------------------------------------------------------- the task
def copy_task_batch(batch: int, generator: torch.Generator) -> torch.Tensor:
    """``[batch, SEQ_LEN]`` ids: a random half-length prefix over TASK_VOCAB ids, then the same prefix again."""
    prefix = torch.randint(0, TASK_VOCAB, (batch, SEQ_LEN // 2), generator=generator)  # [B, T/2]
    return torch.cat([prefix, prefix], dim=1)  # [B, T]


def next_token_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = logits_of(model(ids))  # [B, T, vocab]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train(model: nn.Module, steps: int, console: Console, batch: int = 4, lr: float = 3e-3) -> list[float]:
    """``steps`` AdamW steps on the copy task with a progress bar; returns the losses."""
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    columns = (TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("train", total=steps, loss=float("nan"))
        for _ in range(steps):
            loss = next_token_loss(model, copy_task_batch(batch, generator))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            progress.update(task, advance=1, loss=losses[-1])
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------- generation
def _cache_bytes(cache) -> int:
    """Bytes of K/V an HF cache (DynamicCache, any version) or a HySparseCache holds."""
    if hasattr(cache, "nbytes") and isinstance(cache.nbytes, int):
        return cache.nbytes
    tensors = []
    for layer in getattr(cache, "layers", []):
        tensors += [getattr(layer, "keys", None), getattr(layer, "values", None)]
    tensors += list(getattr(cache, "key_cache", [])) + list(getattr(cache, "value_cache", []))
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _timed_generate(model: nn.Module, ids: torch.Tensor, new: int, hysparse: bool):
    """Greedy generation of `new` tokens; returns (tokens, seconds, cache bytes or None, cached logits [new, V])."""
    import hysparse_compile as hc

    start = time.perf_counter()
    if hysparse:  # static: allocated once for the whole generation, so its bytes are the plan at that context
        cache = hc.HySparseCache(model, batch_size=ids.shape[0], max_cache_len=ids.shape[1] + new)
        out, steps = ids, []
        step_ids = ids
        for _ in range(new):
            logits = logits_of(model(step_ids, past_key_values=cache, use_cache=True))[:, -1]  # [1, V]
            steps.append(logits)
            step_ids = logits.argmax(-1, keepdim=True)
            out = torch.cat([out, step_ids], 1)
        return out, time.perf_counter() - start, cache.nbytes, torch.cat(steps)
    if getattr(model, "config", None) is not None:  # HF: its own generate and DynamicCache
        res = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
        cache = getattr(res, "cache", None) or getattr(res, "past_key_values", None)
        return res.sequences, time.perf_counter() - start, _cache_bytes(cache), None
    out = ids  # a plain module has no cache: each step re-runs the whole sequence
    for _ in range(new):
        out = torch.cat([out, logits_of(model(out))[:, -1:].argmax(-1)], 1)
    return out, time.perf_counter() - start, None, None


@torch.no_grad()
def generation_report(original: nn.Module, compiled: nn.Module, prompt_len: int, new: int, console: Console,
                      seed: int = 3) -> bool:
    """Greedy generation of `new` tokens after a random `prompt_len`-token prompt with the original model (HF
    cache, or recomputation for plain modules) and the compiled one (HySparseCache): a table of tokens/s and cache
    bytes, and the check that the compiled model's cached logits equal re-running it on the whole sequence.
    Returns that check's result."""
    ids = torch.randint(0, VOCAB, (1, prompt_len), generator=torch.Generator().manual_seed(seed))  # [1, T]
    rows = []
    for name, model, hysparse in (("original", original, False), ("HySparse", compiled, True)):
        out, seconds, nbytes, steps = _timed_generate(model, ids, new, hysparse)
        rows.append((name, out, seconds, nbytes, steps))
    console.print(f"greedy generation: prompt {prompt_len} tokens, {new} new, batch 1, {ids.device.type}")
    table = Table()
    for col in ("model", "tokens/s", "KV cache", "vs original"):
        table.add_column(col, justify="left" if col == "model" else "right")
    base = rows[0][3]
    for name, out, seconds, nbytes, _ in rows:
        ratio = f"{base / nbytes:.2f}x smaller" if base and nbytes and name != "original" else ""
        kv = f"{nbytes / 2**10:.1f} KiB" if nbytes is not None else "none (recomputes)"
        table.add_row(name, f"{new / seconds:.1f}", kv, ratio)
    console.print(table)
    out, steps = rows[1][1], rows[1][4]
    full = logits_of(compiled(out[:, :-1]))[0, prompt_len - 1:]  # [new, V] the whole sequence at once
    err = ((steps - full).abs().max() / full.abs().max()).item()
    ok = bool(math.isfinite(err) and err <= EXACT_RTOL)
    console.print(f"cached decoding vs re-running the whole sequence: max relative error of logits {err:.2e} "
                  f"(tolerance {EXACT_RTOL:.0e}) -> {'PASS' if ok else 'FAIL'}", style="bold green" if ok else "bold red")
    console.print("generated: " + " ".join(str(int(t)) for t in out[0, prompt_len:prompt_len + 24]) +
                  (" ..." if new > 24 else ""))
    return ok


# ---------------------------------------------------------------------------------------------- main
def exactness_check(model: nn.Module, console: Console) -> bool:
    """Training-free compile with every block selected must reproduce ``model``'s logits."""
    import hysparse_compile as hc

    layers = num_attention_layers(model)
    schedule = Schedule.hybrid(layers, 3, mode="training_free", block_size=16, topk=SEQ_LEN, window=32)
    ids = torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(2))  # [2, T]
    with torch.no_grad():
        expected = logits_of(model(ids))  # [2, T, vocab]
        compiled = hc.compile(model, schedule, example_inputs=(ids[:1],))
        got = logits_of(compiled(ids))
    err = ((got.double() - expected.double()).abs().max() / expected.double().abs().max()).item()
    ok = bool(math.isfinite(err) and err <= EXACT_RTOL)
    console.print(f"training_free, topk={SEQ_LEN} >= T={SEQ_LEN}: max relative error of logits {err:.2e} "
                  f"(tolerance {EXACT_RTOL:.0e}) -> {'PASS' if ok else 'FAIL'}",
                  style="bold green" if ok else "bold red")
    return ok


def main() -> int:
    """Run the demo; returns the process exit code (0, or 1 if the exactness check fails)."""
    import hysparse_compile as hc

    start = time.perf_counter()
    console = Console(highlight=False)
    model = build_model("llama-tiny")
    pristine = copy.deepcopy(model)  # training below updates the shared weights; the check uses these
    config = model.config
    schedule = Schedule.hybrid(config.num_hidden_layers, 3, block_size=16, topk=64, window=32)
    console.rule("[bold]1. compile a small Llama (8 layers, hidden 128, 4 heads / 2 KV heads) with a 1:3 schedule")
    console.print(f"schedule: pattern {schedule.pattern}, block_size 16, topk 64, window 32 "
                  f"(T = {SEQ_LEN} tokens per sequence)")
    example = copy_task_batch(1, torch.Generator().manual_seed(0))  # [1, T]
    compiled = hc.compile(model, schedule, example_inputs=(example,))
    console.print(str(hc.inspect(compiled)), markup=False, soft_wrap=True)

    console.rule("[bold]2. KV cache at a 32k context, this model's shapes, bf16")
    head_dim = config.hidden_size // config.num_attention_heads
    plan = plan_kv(schedule, num_kv_heads=config.num_key_value_heads, head_dim=head_dim, batch=1,
                   seq_len=32768, dtype="bfloat16", num_layers=config.num_hidden_layers)
    console.print(str(plan), markup=False, soft_wrap=True)

    console.rule("[bold]3. forward, then 20 training steps on a copy task")
    with torch.no_grad():
        logits = logits_of(compiled(example))
    console.print(f"forward: input {tuple(example.shape)} -> logits {tuple(logits.shape)}, finite: "
                  f"{bool(torch.isfinite(logits).all())}")
    losses = train(compiled, steps=20, console=console)
    console.print("loss: " + " ".join(f"{x:.2f}" for x in losses))
    console.print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} "
                  f"({'down' if losses[-1] < losses[0] else 'NOT down'}; uniform guess is {math.log(VOCAB):.3f})")

    console.rule("[bold]4. generate 32 tokens with the KV cache (the trained weights)")
    trained = copy.deepcopy(pristine)
    trained.load_state_dict({k: v for k, v in compiled.state_dict().items() if "hysparse" not in k})
    decoded = generation_report(trained, compiled, prompt_len=100, new=32, console=console)

    console.rule("[bold]5. training-free exactness check")
    ok = exactness_check(pristine, console)
    console.print(f"demo finished in {time.perf_counter() - start:.1f} s")
    return 0 if ok and decoded else 1


if __name__ == "__main__":
    raise SystemExit(main())
