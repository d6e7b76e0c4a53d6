"""Compile a hand-written nanoGPT-style model (unmodified user code) into HySparse, then run forward and backward.

Run: python examples/compile_nanogpt.py
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import hysparse_compile as hc


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # [B, H, T, d]
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, d]
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size=256, block_size=256, n_layer=6, n_head=4, n_embd=128):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as in nanoGPT
        for module in self.modules():  # nanoGPT's init: N(0, 0.02) weights, zero biases
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx):
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # [B, T, vocab]


torch.manual_seed(0)
model = GPT()
schedule = hc.Schedule.hybrid(6, 2, block_size=16, topk=64, window=32)  # F S S F S F
print(f"schedule: {schedule.pattern}")
idx = torch.randint(0, 256, (2, 128))  # [B, T]
compiled = hc.compile(model, schedule, example_inputs=(idx[:1],))

logits = compiled(idx)  # same call and output as the original model
print(f"logits {tuple(logits.shape)}")
loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())
loss.backward()
print(f"loss {loss.item():.3f} (uniform guess {math.log(256):.3f})")
grads = {name: p.grad for name, p in compiled.named_parameters()}
assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), "missing or non-finite gradients"
print(f"{len(grads)} parameters got finite gradients, new HySparse weights included")
