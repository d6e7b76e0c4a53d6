"""Float64 oracle pieces beyond the prefill ops of `oracle.py`: the two decode ops (one new token against a cache, the
SWA window read from a ring) and a whole HySparse model computed by the oracle (an original HF Llama whose attention
modules are replaced by oracle-based HySparse attention).

Independent of the package (never imports `hysparse_compile`): written from SPEC §2, docs/design.md's op contract
("Decode": the new token at t = cache_len - 1; the ring holds position p in slot p % W) and docs/compiler.md's layout
of the new weights (`gate.weight` rows laid out `[branches, Hq, e]`, branch 0 the sparse gate, branch 1 the SWA gate;
`sinks` one logit per query head). Slow and obviously right: the ops loop over rows and heads.
"""
from __future__ import annotations

import copy
import types

import torch
from oracle import oracle_full, oracle_sparse


def _attend(qt, keys, vals, scale, sink=None):
    """Softmax attention of one query [d] over key/value rows [n, d], float64; `sink` a logit that joins the
    denominator (a key of value 0). No key: zeros."""
    if keys.shape[0] == 0:
        return torch.zeros(vals.shape[-1], dtype=torch.float64)
    logits = (keys @ qt) * scale
    if sink is not None:
        logits = torch.cat([logits, torch.as_tensor(sink, dtype=torch.float64).view(1)])
    return torch.softmax(logits, 0)[: keys.shape[0]] @ vals


def full_decode(q, k_cache, v_cache, cache_len, block_size, topk, scale=None):
    """`full_attention_decode`: q [B, Hq, 1, d], k_cache/v_cache [B, Hkv, S, d], cache_len int [B] (the new token is
    at t = cache_len[b] - 1 and reads slots 0 .. t) -> out float64 [B, Hq, 1, d], indices int64 [B, Hkv, 1, nsel]:
    causal attention, block scores S[h, j] = max over keys i <= t of block j of the probabilities, group max over the
    G heads of each KV group, the top nsel candidate blocks (j * block_size <= t; ties to the lower index), ascending,
    -1 padded."""
    q, k_cache, v_cache = q.double(), k_cache.double(), v_cache.double()
    B, Hq, _, d = q.shape
    Hkv = k_cache.shape[1]
    G, nsel = Hq // Hkv, topk // block_size
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros(B, Hq, 1, d, dtype=torch.float64)
    indices = torch.full((B, Hkv, 1, nsel), -1, dtype=torch.int64)
    for b in range(B):
        t = int(cache_len[b]) - 1
        nb = t // block_size + 1  # blocks with a key at or before t: the candidates
        scores = [[0.0] * nb for _ in range(Hq)]
        for h in range(Hq):
            p = torch.softmax((k_cache[b, h // G, : t + 1] @ q[b, h, 0]) * scale, 0)
            out[b, h, 0] = p @ v_cache[b, h // G, : t + 1]
            for j in range(nb):
                scores[h][j] = p[j * block_size: (j + 1) * block_size].max().item()
        for g in range(Hkv):
            group = [max(scores[h][j] for h in range(g * G, (g + 1) * G)) for j in range(nb)]
            chosen = sorted(sorted(range(nb), key=lambda j: (-group[j], j))[:nsel])
            indices[b, g, 0, : len(chosen)] = torch.tensor(chosen)
    return out, indices


def ring_slot(p: int, W: int) -> int:
    """The ring slot of position p (docs/design.md: position p lives in slot p % W)."""
    return p % W


def sparse_decode(q, k_win, v_win, k_shared, v_shared, indices, cache_len, block_size, window, gate_sparse=None,
                  gate_swa=None, sinks=None, scale=None, merge=False):
    """`sparse_attention_decode`: q [B, Hq, 1, d]; k_win/v_win [B, Hkv, W, d] the SWA ring (position p in slot
    p % W, W >= window; not read with merge); k_shared/v_shared [B, Hkv, S, d]; indices [B, Hkv, 1, nsel]; cache_len
    [B] (t = cache_len[b] - 1); gates broadcastable to [B, Hq, 1, 1 | d] or None; window None or 0 = no SWA branch
    -> float64 [B, Hq, 1, d]. The sparse branch reads k_shared at the keys i <= t of the selected blocks; the SWA
    branch the positions max(0, t - window + 1) .. t from their ring slots; sinks join each branch's denominator;
    out = gate_sparse * o_sparse + gate_swa * o_swa. merge: one softmax over the selected keys and the window's,
    both read from k_shared."""
    q = q.double()
    k_win, v_win, k_shared, v_shared = (x.double() for x in (k_win, v_win, k_shared, v_shared))
    B, Hq, _, d = q.shape
    Hkv, W = k_shared.shape[1], k_win.shape[2]
    G = Hq // Hkv
    scale = d ** -0.5 if scale is None else scale
    window = window or None
    assert window is None or merge or W >= window, "the ring must hold the whole window"
    gs, gw = (None if g is None else g.double().expand(B, Hq, 1, g.shape[-1]) for g in (gate_sparse, gate_swa))
    out = torch.zeros(B, Hq, 1, d, dtype=torch.float64)
    for b in range(B):
        t = int(cache_len[b]) - 1
        win = list(range(max(0, t - window + 1), t + 1)) if window else []
        for h in range(Hq):
            g = h // G
            sink = None if sinks is None else float(sinks[h])
            blocks = {int(j) for j in indices[b, g, 0] if int(j) >= 0}
            sel = [i for i in range(t + 1) if i // block_size in blocks]
            qt = q[b, h, 0]
            if merge:
                keys = sorted(set(sel) | set(win))
                out[b, h, 0] = _attend(qt, k_shared[b, g, keys], v_shared[b, g, keys], scale, sink)
                continue
            o = _attend(qt, k_shared[b, g, sel], v_shared[b, g, sel], scale, sink)
            o = o * (gs[b, h, 0] if gs is not None else 1.0)
            if window:
                slots = [ring_slot(p, W) for p in win]
                o_swa = _attend(qt, k_win[b, g, slots], v_win[b, g, slots], scale, sink)
                o = o + o_swa * (gw[b, h, 0] if gw is not None else 1.0)
            out[b, h, 0] = o
    return out


def randomize_new_weights(compiled, seed: int = 0) -> dict:
    """Set a compiled model's new weights (`*.hysparse.gate.weight`, `*.hysparse.sinks`) to seeded random values:
    gate weights N(0, 0.3^2) (the gates sigmoid(W x) then differ per token, head, channel and branch, about 0.1 to
    0.9) and one N(0, 1) sink per head. With the 0.5-gate / 0-sink init a swapped gate, a gate read from another head
    or a dropped sink would leave the logits as they are. -> {name: tensor} of what was set."""
    g = torch.Generator().manual_seed(seed)
    new = {}
    with torch.no_grad():
        for name, p in compiled.named_parameters():
            if ".hysparse." in f".{name}":
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.endswith("gate.weight") else 1.0))
                new[name] = p.detach().clone()
    return new


def ring_of(k, lengths, W):
    """A ring [B, Hkv, W, d] holding row b's last W positions of k [B, Hkv, S, d] (positions < lengths[b]) at slots
    p % W; slots that hold no position are filled with large values (a reader must ignore them)."""
    ring = torch.full((*k.shape[:2], W, k.shape[-1]), 1e3, dtype=k.dtype)
    for b, n in enumerate(int(x) for x in lengths):
        for p in range(max(0, n - W), n):
            ring[b, :, p % W] = k[b, :, p]
    return ring


# ------------------------------------------------------------------------------------------------ the oracle model
class OracleHySparseLlama:
    """An HF Llama whose attention layers compute HySparse with the oracle ops in float64: the original's
    projections, RoPE, norms and MLPs (a float64 copy), and

    - full layers (`pattern[i] == "F"`): causal attention and the block selection of `oracle_full`;
    - sparse layers: `oracle_sparse` over the K/V the mode names (`kv_sharing`: "sparse_branch" = the preceding full
      layer's K/V for the sparse branch and its own for the window; "both" = the full layer's for both; "none" = its
      own for both), the preceding full layer's indices, the window (None when `swa=False`), and the compiled model's
      gate weights and sinks (`params`: its `state_dict()`); `merge=True` is the training-free single softmax over
      the layer's own K/V with no gates and no sinks.

    logits(ids [B, T]) -> float64 [B, T, vocab] for unpadded rows.
    """

    def __init__(self, original, pattern: str, *, block_size: int, topk: int, window: int | None,
                 kv_sharing: str = "sparse_branch", swa: bool = True, merge: bool = False, params: dict | None = None):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.model = copy.deepcopy(original).double().eval()
        self.pattern, self.block_size, self.topk = pattern.replace(" ", ""), block_size, topk
        self.window = window if (swa or merge) else None
        self.kv_sharing, self.merge = kv_sharing, merge
        self.full = {}  # layer -> (k, v, indices) of the forward in progress
        layers = self.model.model.layers
        assert len(self.pattern) == len(layers) and self.pattern[0] == "F"
        params = params or {}
        self.gates, self.sinks = {}, {}
        for i in range(len(layers)):
            w, s = params.get(f"model.layers.{i}.hysparse.gate.weight"), params.get(f"model.layers.{i}.hysparse.sinks")
            self.gates[i] = None if w is None else w.detach().double()
            self.sinks[i] = None if s is None else s.detach().double()
        oracle = self

        def forward(attn, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
            B, T, _ = hidden_states.shape
            shape = (B, T, -1, attn.head_dim)
            q = attn.q_proj(hidden_states).view(shape).transpose(1, 2)  # [B, Hq, T, d]
            k = attn.k_proj(hidden_states).view(shape).transpose(1, 2)  # [B, Hkv, T, d]
            v = attn.v_proj(hidden_states).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
            out = oracle.attention(attn.layer_idx, hidden_states, q, k, v, attn.scaling)
            return attn.o_proj(out.to(hidden_states.dtype).transpose(1, 2).reshape(B, T, -1)), None

        for layer in layers:
            layer.self_attn.forward = types.MethodType(forward, layer.self_attn)

    def attention(self, i, x, q, k, v, scale):
        """Layer i's HySparse attention: x [B, T, hidden] the layer input (the gates' input), q/k/v post-RoPE."""
        if self.pattern[i] == "F":
            out, _, indices = oracle_full(q, k, v, self.block_size, self.topk, scale)
            self.full[i] = (k, v, indices)
            return out
        source = max(j for j in range(i) if self.pattern[j] == "F")
        k_full, v_full, indices = self.full[source]
        if self.merge:
            return oracle_sparse(q, k, v, k, v, indices, self.block_size, self.window, sinks=self.sinks[i],
                                 scale=scale, merge=True)
        k_sh, v_sh = (k, v) if self.kv_sharing == "none" else (k_full, v_full)
        k_own, v_own = (k_full, v_full) if self.kv_sharing == "both" else (k, v)
        gates = [None, None]
        if self.gates[i] is not None:
            B, T, _ = x.shape
            branches = 1 if self.window is None else 2
            g = torch.sigmoid(x @ self.gates[i].T).view(B, T, branches, q.shape[1], -1)  # [B, T, branches, Hq, e]
            gates[:branches] = g.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, Hq, T, e]
        return oracle_sparse(q, k_own, v_own, k_sh, v_sh, indices, self.block_size, self.window, gates[0], gates[1],
                             self.sinks[i], scale)

    @torch.no_grad()
    def logits(self, ids):
        self.full = {}
        return self.model(input_ids=ids, use_cache=False).logits
