"""Compile a HuggingFace Llama into a HySparse model and fine-tune it for a few steps.

Run: python examples/compile_hf_llama_and_train.py

The model is built from a small config with random weights (no download); with a real checkpoint, replace the
config with `LlamaForCausalLM.from_pretrained(...)` and the schedule with `Schedule.hybrid(num_layers, 3)`.
"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hysparse_compile as hc

torch.manual_seed(0)
config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     attn_implementation="sdpa")
model = LlamaForCausalLM(config)

# 1 full layer, then 2 sparse layers that reuse its K/V and block selection; the last layer is full.
schedule = hc.Schedule.from_pattern("F S S F", block_size=16, topk=64, window=32)
example = torch.randint(0, 32, (1, 128))  # [1, T]: the compiler captures the graph with it
compiled = hc.compile(model, schedule, example_inputs=(example,))

# The compiled model keeps the original weights (shared, not copied) and adds gates and sinks to sparse layers.
original = {name for name, _ in model.named_parameters()}
added = [name for name, _ in compiled.named_parameters() if name not in original]
print(f"new parameters: {len(added)}, e.g. {added[:3]}")

optimizer = torch.optim.AdamW(compiled.parameters(), lr=3e-3)
compiled.train()
losses = []
for step in range(10):
    batch = torch.randint(0, 32, (2, 64))
    ids = torch.cat([batch, batch], dim=1)  # [2, 128]: a copy task, the second half repeats the first
    loss = compiled(ids, labels=ids).loss  # same call and output class as the HF model (loss, logits)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
    print(f"step {step:2d}  loss {loss.item():.3f}")
assert losses[-1] < losses[0], "loss did not go down"
print(compiled.kv_plan)
