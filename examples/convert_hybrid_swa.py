"""Convert a Hybrid-SWA model (Gemma 3 shaped: sliding-window layers around global ones) to HySparse, then fine-tune
it with transformers.Trainer, a LoRA adapter (PEFT) and gradient checkpointing.

Run: python examples/convert_hybrid_swa.py        (CPU, well under a minute)

The model is a tiny Gemma 3 (text) built from a config with random weights (no download); with a real checkpoint use
`Gemma3ForCausalLM.from_pretrained(...)` (or gpt-oss, Gemma 2, Mistral with sliding_window) and the same calls.

1. `Schedule.from_model(model, mode="training_free", topk=0)` keeps every layer as it is — global layers full,
   sliding layers their window — and the compiled model reproduces the original (printed: the largest difference).
2. `Schedule.from_model(model, topk=...)` is the conversion: global layers stay full and now select key blocks,
   sliding layers after a global layer become sparse layers (their SWA branch is the original window, plus the blocks
   the global layer selected, read from its K/V), the sliding layers before the first global layer stay window-only.
3. LoRA on q/v, then compile, then Trainer with gradient checkpointing: the adapters and the new gates train.
The KV plan is printed before (the original: global layers every token, sliding layers their window) and after.
"""
import warnings

import torch
from peft import LoraConfig, get_peft_model
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Trainer, TrainingArguments

import hysparse_compile as hs

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames (gradient -> activation ...)
torch.manual_seed(0)
config = Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                          sliding_window=16, sliding_window_pattern=3, query_pre_attn_scalar=16,
                          attn_implementation="sdpa")
model = Gemma3ForCausalLM(config).eval()
print("original layer types:", ", ".join(t.replace("_attention", "") for t in config.layer_types))
plan = dict(num_kv_heads=2, head_dim=16, batch=1, seq_len=4096, dtype=torch.bfloat16)

# The original, as a schedule: global layers F, every sliding layer window-only W with its window.
original = hs.Schedule.from_model(model, block_size=16, sliding="window", mode="training_free", topk=0)
print(f"\nKV plan before (the original, pattern {original.pattern}):")
print(hs.plan_kv(original, **plan))

# 1. Nothing selected: the compiled model is the original.
exact = hs.compile(model, hs.Schedule.from_model(model, block_size=16, mode="training_free", topk=0))
ids = torch.randint(0, 256, (2, 64))  # four windows long
with torch.no_grad():
    diff = (exact(ids).logits - model(ids).logits).abs().max().item()
print(f"training_free, topk=0 ({exact.schedule.pattern}): max |compiled - original| = {diff:.1e}")
assert diff < 1e-4

# 2 and 3. LoRA, then the HySparse conversion, then Trainer with gradient checkpointing.
peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16,
                                              task_type="CAUSAL_LM"))
schedule = hs.Schedule.from_model(peft_model, block_size=16, topk=32)  # windows stay 16; 2 blocks selected
compiled = hs.compile(peft_model, schedule, example_inputs=ids)
print(f"\nconverted: pattern {schedule.pattern} (W: window-only, F: full + selection, S: sparse)")
print(f"KV plan after ({schedule.pattern}):")
print(hs.plan_kv(schedule, **plan))


class CopyTask(torch.utils.data.Dataset):
    """Rows whose second half repeats the first: the copy needs tokens beyond the 16-token window."""

    def __init__(self, n=32, half=32):
        g = torch.Generator().manual_seed(1)
        first = torch.randint(0, 256, (n, half), generator=g)
        self.rows = torch.cat([first, first], 1)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


args = TrainingArguments(output_dir="convert_hybrid_swa_out", per_device_train_batch_size=4, max_steps=8,
                         learning_rate=1e-2, logging_steps=2, report_to=[], use_cpu=True, disable_tqdm=True,
                         save_strategy="no", gradient_checkpointing=True)
before = {n: p.detach().clone() for n, p in compiled.named_parameters() if p.requires_grad}
print(f"\ntrainable: {len(before)} tensors (LoRA {sum('lora_' in n for n in before)}, "
      f"gates {sum('.hysparse.' in n for n in before)}); the base weights stay frozen")
trainer = Trainer(model=compiled, args=args, train_dataset=CopyTask())
trainer.train()
losses = [round(entry["loss"], 3) for entry in trainer.state.log_history if "loss" in entry]
moved = [n for n, p in compiled.named_parameters() if n in before and not torch.equal(p, before[n])]
print(f"losses every 2 steps: {losses}; gradient checkpointing: {compiled.is_gradient_checkpointing}; "
      f"{len(moved)} of {len(before)} trainable tensors moved")
assert len(moved) == len(before), "every LoRA weight and gate trains"
