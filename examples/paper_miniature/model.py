"""The miniature's decoder: a plain nanoGPT-style module with RoPE and GQA, which `hs.compile` rewrites unmodified.

    python examples/paper_miniature/model.py            # prints the GPU config and its parameter count

Every attention layer is `F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)`, except the
layers listed in `GPTConfig.swa_layers` (the Hybrid-SWA baseline), which pass an explicit boolean band mask of
`window` keys instead. Nothing here knows about HySparse: `variants.py` decides what to compile.

`generate_plain` is a cached greedy decoder for the uncompiled model (full layers keep every K/V, SWA layers a ring
of their last `window`), so the baselines have a decode speed too; compiled models decode with `hs.generate`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 256  # bytes
    context: int = 4096  # longest sequence (RoPE tables are built for it)
    n_layer: int = 8
    n_embd: int = 256
    n_head: int = 4  # query heads
    n_kv_head: int = 1  # GQA: 4 query heads per KV head
    mlp_ratio: int = 4
    rope_base: float = 10000.0
    window: int = 128  # SWA window of the layers in swa_layers
    swa_layers: list[int] = field(default_factory=list)  # layers with sliding-window attention (Hybrid SWA)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def rope_tables(head_dim: int, context: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [context, head_dim // 2] of rotary embeddings (half-split layout, as Llama)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # [d/2]
    angles = torch.outer(torch.arange(context, dtype=torch.float64), inv_freq)  # [context, d/2]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, d], cos/sin [T, d/2] -> x rotated, in x's dtype (`type_as` keeps bf16 under autocast, so the
    compiled HySparse ops see one dtype for q, k and v)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


def band_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """bool [Tq, Tk]: key i is visible from query t when t - window < i <= t."""
    dist = q_pos[:, None] - k_pos[None, :]
    return (dist >= 0) & (dist < window)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, window: int | None):
        super().__init__()
        self.n_head, self.n_kv_head, self.d = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.window = window  # None: full causal attention
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * self.d, bias=False)
        self.kv_proj = nn.Linear(cfg.n_embd, 2 * cfg.n_kv_head * self.d, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * self.d, cfg.n_embd, bias=False)

    def qkv(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.d).transpose(1, 2)  # [B, Hq, T, d]
        k, v = self.kv_proj(x).view(B, T, 2 * self.n_kv_head, self.d).transpose(1, 2).chunk(2, dim=1)  # [B, Hkv, T, d]
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, k, v, mask):
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # [B, Hq, T, d]
        # a band mask: repeat the KV heads (the memory-efficient SDPA kernel takes a mask but not enable_gqa)
        G = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def forward(self, x, cos, sin, swa_mask):
        q, k, v = self.qkv(x, cos, sin)
        y = self.attend(q, k, v, swa_mask if self.window is not None else None)
        B, T, _ = x.shape
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, window: int | None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg, window)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd))

    def forward(self, x, cos, sin, swa_mask):
        x = x + self.attn(self.ln_1(x), cos, sin, swa_mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """idx int64 [B, T] -> logits [B, T, vocab]. RoPE positions are `arange(T)` (the compiled model's cache offsets
    that arange when it decodes)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.h = nn.ModuleList([Block(cfg, cfg.window if i in cfg.swa_layers else None) for i in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.context, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)  # [context, d/2]
        self.register_buffer("rope_sin", sin, persistent=False)
        for name, p in self.named_parameters():  # nanoGPT's init, residual projections scaled by depth
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith(("o_proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx):
        T = idx.size(1)
        pos = torch.arange(T, device=idx.device)  # [T]
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # [T, d/2]
        swa_mask = band_mask(pos, pos, self.cfg.window) if self.cfg.swa_layers else None  # [T, T]
        x = self.wte(idx)
        for block in self.h:
            x = block(x, cos, sin, swa_mask)
        return self.lm_head(self.ln_f(x))  # [B, T, vocab]

    # ------------------------------------------------------------------ cached decoding of the plain model
    def forward_cached(self, idx, kv: list, start: int):
        """Run idx [B, R] at positions start .. start+R-1 against `kv` (per layer [k, v] or None), updating it.
        Full layers keep every K/V; SWA layers keep only their last `window` (a ring, as a real deployment would)."""
        B, R = idx.shape
        pos = torch.arange(start, start + R, device=idx.device)
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        x = self.wte(idx)
        for i, block in enumerate(self.h):
            attn = block.attn
            h = block.ln_1(x)
            q, k, v = attn.qkv(h, cos, sin)
            if kv[i] is not None:
                k, v = torch.cat([kv[i][0], k], dim=2), torch.cat([kv[i][1], v], dim=2)
            k_pos = torch.arange(start + R - k.shape[2], start + R, device=idx.device)
            if attn.window is None:
                mask = None if R == 1 else band_mask(pos, k_pos, k.shape[2] + R)  # causal over the cache
                kv[i] = [k, v]
            else:
                mask = band_mask(pos, k_pos, attn.window)
                kv[i] = [k[:, :, -attn.window:], v[:, :, -attn.window:]]
            G = attn.n_head // attn.n_kv_head
            y = F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
                                               attn_mask=mask)
            x = x + attn.o_proj(y.transpose(1, 2).reshape(B, R, -1))
            x = x + block.mlp(block.ln_2(x))
        return self.lm_head(self.ln_f(x))


def kv_cache_bytes(cfg: GPTConfig, seq_len: int, *, batch: int = 1, itemsize: int = 2) -> int:
    """KV bytes `generate_plain` keeps at `seq_len` tokens: full layers all of them, SWA layers `window`."""
    per_token = 2 * cfg.n_kv_head * cfg.head_dim * itemsize * batch
    return sum(per_token * (min(cfg.window, seq_len) if i in cfg.swa_layers else seq_len) for i in range(cfg.n_layer))


@torch.no_grad()
def generate_plain(model: GPT, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding of the uncompiled model with a KV cache: ids [B, T] -> [B, T + max_new_tokens]."""
    kv = [None] * model.cfg.n_layer
    logits = model.forward_cached(ids, kv, 0)[:, -1]
    out = [ids]
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1, keepdim=True)  # [B, 1]
        out.append(nxt)
        if step + 1 < max_new_tokens:
            logits = model.forward_cached(nxt, kv, ids.shape[1] + step)[:, -1]
    return torch.cat(out, dim=1)


if __name__ == "__main__":
    cfg = GPTConfig()
    model = GPT(cfg)
    n = sum(p.numel() for p in model.parameters())
    print(f"{cfg}\n{n / 1e6:.2f}M parameters, head_dim {cfg.head_dim}, GQA group {cfg.n_head // cfg.n_kv_head}")
