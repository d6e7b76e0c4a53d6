"""Tiny test models: hand-written decoders and HF families built from small configs (random weights, no downloads).

Every builder seeds torch so two calls give the same weights, and returns the model in eval mode with dropout off.
"""
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 128
HIDDEN = 64
LAYERS = 4
MAX_POS = 128


class _NanoAttention(nn.Module):
    """nanoGPT CausalSelfAttention: fused qkv, F.scaled_dot_product_attention(is_causal=True); with kv_heads < heads
    the K/V heads are shared through SDPA's enable_gqa=True."""

    def __init__(self, hidden: int, heads: int, kv_heads: int | None = None):
        super().__init__()
        self.heads, self.kv_heads, self.d = heads, kv_heads or heads, hidden // heads
        self.c_attn = nn.Linear(hidden, hidden + 2 * self.kv_heads * self.d)
        self.c_proj = nn.Linear(hidden, hidden)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split([C, self.kv_heads * self.d, self.kv_heads * self.d], dim=2)
        q = q.view(B, T, self.heads, self.d).transpose(1, 2)  # [B, H, T, d]
        k = k.view(B, T, self.kv_heads, self.d).transpose(1, 2)  # [B, Hkv, T, d]
        v = v.view(B, T, self.kv_heads, self.d).transpose(1, 2)
        gqa = {"enable_gqa": True} if self.kv_heads != self.heads else {}
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class _SoftmaxAttention(nn.Module):
    """Explicit softmax(q k^T * scale + mask) v with GQA by repeat_interleave and a tril buffer mask."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, max_pos: int, scale: float | None = None,
                 mask: str = "causal"):
        super().__init__()
        self.mask = mask  # "causal" | "none" (bidirectional) | "alibi" (causal plus a distance bias) | "window"
        self.heads, self.kv_heads, self.d = heads, kv_heads, hidden // heads
        self.scale = scale if scale is not None else 1.0 / math.sqrt(self.d)
        self.q_proj = nn.Linear(hidden, heads * self.d, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.d, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.d, bias=False)
        self.o_proj = nn.Linear(heads * self.d, hidden, bias=False)
        self.register_buffer("bias", torch.tril(torch.ones(max_pos, max_pos)).view(1, 1, max_pos, max_pos))

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.d).transpose(1, 2)  # [B, Hq, T, d]
        k = self.k_proj(x).view(B, T, self.kv_heads, self.d).transpose(1, 2)  # [B, Hkv, T, d]
        v = self.v_proj(x).view(B, T, self.kv_heads, self.d).transpose(1, 2)
        G = self.heads // self.kv_heads
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
        att = (q @ k.transpose(-2, -1)) * self.scale  # [B, Hq, T, T]
        if self.mask == "alibi":
            pos = torch.arange(T, device=x.device)
            att = att - 0.1 * (pos[:, None] - pos[None, :]).abs()
        if self.mask == "window":
            pos = torch.arange(T, device=x.device)
            att = att.masked_fill(pos[:, None] - pos[None, :] >= 4, float("-inf"))
        if self.mask != "none":
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v  # [B, Hq, T, d]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class _Block(nn.Module):
    def __init__(self, hidden: int, attn: nn.Module):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(hidden), attn, nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyDecoder(nn.Module):
    """A plain decoder: ``forward(input_ids [B, T]) -> logits [B, T, vocab]`` (a tensor, not a ModelOutput)."""

    def __init__(self, attn_factory, layers: int = LAYERS, hidden: int = HIDDEN, vocab: int = VOCAB,
                 max_pos: int = MAX_POS):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, hidden), nn.Embedding(max_pos, hidden)
        self.h = nn.ModuleList(_Block(hidden, attn_factory()) for _ in range(layers))
        self.ln_f, self.lm_head = nn.LayerNorm(hidden), nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids):
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)  # [B, T, hidden]
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def nano_gpt(layers: int = LAYERS, heads: int = 4, kv_heads: int | None = None, seed: int = 0) -> TinyDecoder:
    torch.manual_seed(seed)
    return TinyDecoder(lambda: _NanoAttention(HIDDEN, heads, kv_heads), layers=layers).eval()


def softmax_gqa(layers: int = LAYERS, heads: int = 4, kv_heads: int = 2, scale: float | None = None,
                mask: str = "causal", seed: int = 0) -> TinyDecoder:
    torch.manual_seed(seed)
    return TinyDecoder(lambda: _SoftmaxAttention(HIDDEN, heads, kv_heads, MAX_POS, scale, mask),
                       layers=layers).eval()


class MLPOnly(nn.Module):
    """No attention at all: embeddings, an MLP, a head."""

    def __init__(self, vocab: int = VOCAB, hidden: int = HIDDEN):
        super().__init__()
        self.wte, self.mlp = nn.Embedding(vocab, hidden), nn.Sequential(nn.Linear(hidden, hidden), nn.GELU())
        self.lm_head = nn.Linear(hidden, vocab)

    def forward(self, input_ids):
        return self.lm_head(self.mlp(self.wte(input_ids)))


def _hf_common(layers: int, heads: int, kv_heads: int) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=MAX_POS,
                tie_word_embeddings=False, attention_dropout=0.0)


def hf_model(family: str, attn: str = "sdpa", layers: int = LAYERS, heads: int = 4, kv_heads: int = 2,
             seed: int = 0):
    """A tiny HF causal LM of ``family`` ("llama", "mistral", "qwen2", "gpt2") with ``attn`` implementation."""
    import transformers as tf

    torch.manual_seed(seed)
    if family == "gpt2":
        config = tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=layers, n_head=heads, n_positions=MAX_POS,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        cls = tf.GPT2LMHeadModel
    elif family == "llama":
        config, cls = tf.LlamaConfig(**_hf_common(layers, heads, kv_heads)), tf.LlamaForCausalLM
    elif family == "mistral":
        config = tf.MistralConfig(**_hf_common(layers, heads, kv_heads), sliding_window=None)
        cls = tf.MistralForCausalLM
    elif family == "qwen2":
        config, cls = tf.Qwen2Config(**_hf_common(layers, heads, kv_heads)), tf.Qwen2ForCausalLM
    else:
        raise ValueError(f"unknown family {family!r}")
    config._attn_implementation = attn
    model = cls(config)
    model.config._attn_implementation = attn
    return model.eval()


FAMILIES = [(f, a) for f in ("llama", "mistral", "qwen2", "gpt2") for a in ("sdpa", "eager")]


# ------------------------------------------------------------------------------------------- shared compiled models
BLOCK, TOPK, WINDOW = 16, 48, 16  # topk >= every test length (T <= 40): training-free must be exact


def build(name: str, layers: int = 2):
    """A model by name: "nano", "softmax", or "<family>-<attn>" (e.g. "llama-sdpa")."""
    if name == "nano":
        return nano_gpt(layers=layers)
    if name == "softmax":
        return softmax_gqa(layers=layers)
    family, attn = name.split("-")
    return hf_model(family, attn, layers=layers)


MODEL_NAMES = ["nano", "softmax"] + [f"{f}-{a}" for f, a in FAMILIES]


@functools.lru_cache(maxsize=None)
def compiled_pair(name: str, mode: str = "training_free", pattern: str = "FS", **options):
    """(original, compiled) for a model name, shared by every test of the session (torch.export is the slow part)."""
    import hysparse_compile as hs

    model = build(name, layers=len(pattern))
    schedule = hs.Schedule.from_pattern(pattern, block_size=BLOCK, topk=TOPK, window=WINDOW, mode=mode)
    return model, hs.compile(model, schedule, **options)


def logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def cached_logits(compiled, tokens, chunks):
    """Logits of `tokens` fed chunk by chunk (prefill, single tokens, extends) through one HySparseCache."""
    from hysparse_compile.runtime import HySparseCache

    cache, out, t = HySparseCache(compiled), [], 0
    with torch.no_grad():
        for n in chunks:
            out.append(logits(compiled(tokens[:, t:t + n], past_key_values=cache, use_cache=True)))
            t += n
    return torch.cat(out, 1)


# ------------------------------------------------------------------------------------------- issue #20 families
def sharpen(model, factor: float = 8.0):
    """Scale the query/key projections up: with random weights at the usual scale attention is near-uniform, so a
    softcap, a window or a sink would barely change the outputs and block scores would tie to the last bit."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "query_key_value.weight")):
                p.mul_(factor)
    return model


def hf_family(family: str, attn: str = "eager", layers: int | None = None, seed: int = 0):
    """A tiny HF causal LM of a family issue #20 adds (random weights, head dim 16, sharpened attention):

    "gemma2" (soft-capped logits, query_pre_attn_scalar, layers sliding/full/sliding/full), "gemma3" (text; layers
    sliding/sliding/full/sliding), "mistral-window" (every layer sliding), "gpt_oss" (sinks, MoE, sliding/full
    alternating), "falcon" (new_decoder_architecture: fused QKV, GQA). Windows are 8 tokens."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(_hf_common(layers or 4, 4, 2), max_position_embeddings=256)
    types = {"gemma2": ["sliding_attention", "full_attention"] * 2,
             "gemma3": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
             "gpt_oss": ["sliding_attention", "full_attention"] * 2}
    n = layers or 4
    if family == "gemma2":
        config = tf.Gemma2Config(**common, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                                 attn_logit_softcapping=4.0, final_logit_softcapping=30.0,
                                 layer_types=types["gemma2"][:n])
        cls = tf.Gemma2ForCausalLM
    elif family == "gemma3":
        config = tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                                     layer_types=types["gemma3"][:n])
        cls = tf.Gemma3ForCausalLM
    elif family == "mistral-window":
        config, cls = tf.MistralConfig(**common, sliding_window=8), tf.MistralForCausalLM
    elif family == "gpt_oss":
        config = tf.GptOssConfig(**common, head_dim=16, sliding_window=8, num_local_experts=4, num_experts_per_tok=2,
                                 layer_types=types["gpt_oss"][:n],
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        cls = tf.GptOssForCausalLM
    elif family == "falcon":
        config = tf.FalconConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=n, num_attention_heads=4,
                                 num_kv_heads=2, new_decoder_architecture=True, alibi=False, bias=False,
                                 max_position_embeddings=256, tie_word_embeddings=False, attention_dropout=0.0,
                                 hidden_dropout=0.0)
        cls = tf.FalconForCausalLM
    else:
        raise ValueError(f"unknown family {family!r}")
    config._attn_implementation = attn
    model = cls(config)
    model.config._attn_implementation = attn
    if family == "gpt_oss":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 1.0)  # HF initializes them near 0: make them matter
    return sharpen(model, 4.0 if family == "falcon" else 8.0).eval()


def hf_smoke(family: str, attn: str = "sdpa", layers: int = 2, seed: int = 0):
    """A tiny HF causal LM of a family that compiled before issue #20 (one shared config each, 2 layers):
    qwen3_moe, mixtral, phi3, olmo2, gpt_neox, stablelm, granite, cohere, smollm3."""
    import transformers as tf

    torch.manual_seed(seed)
    common = _hf_common(layers, 4, 2)
    if family == "qwen3_moe":
        config = tf.Qwen3MoeConfig(**common, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                   moe_intermediate_size=32, decoder_sparse_step=1)
        cls = tf.Qwen3MoeForCausalLM
    elif family == "mixtral":
        config, cls = tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2), tf.MixtralForCausalLM
    elif family == "phi3":
        config, cls = tf.Phi3Config(**common, pad_token_id=0), tf.Phi3ForCausalLM
    elif family == "olmo2":
        config, cls = tf.Olmo2Config(**common), tf.Olmo2ForCausalLM
    elif family == "gpt_neox":
        config = tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                                  num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=MAX_POS,
                                  tie_word_embeddings=False, attention_dropout=0.0, hidden_dropout=0.0)
        cls = tf.GPTNeoXForCausalLM
    elif family == "stablelm":
        config, cls = tf.StableLmConfig(**common), tf.StableLmForCausalLM
    elif family == "granite":
        config, cls = tf.GraniteConfig(**common), tf.GraniteForCausalLM
    elif family == "cohere":
        config, cls = tf.CohereConfig(**common), tf.CohereForCausalLM
    elif family == "smollm3":
        config, cls = tf.SmolLM3Config(**common, pad_token_id=0), tf.SmolLM3ForCausalLM
    else:
        raise ValueError(f"unknown family {family!r}")
    config._attn_implementation = attn
    model = cls(config)
    model.config._attn_implementation = attn
    return model.eval()


SMOKE_FAMILIES = ("qwen3_moe", "mixtral", "phi3", "olmo2", "gpt_neox", "stablelm", "granite", "cohere", "smollm3")


def hf_refused(family: str, attn: str = "eager", layers: int = 2, seed: int = 0):
    """A tiny HF causal LM of a family compile refuses: "deepseek_v3" (multi-head latent attention: q/k head dim 32,
    V head dim 16, MoE), "bloom" (ALiBi through baddbmm), "mpt" (ALiBi added to the logits)."""
    import transformers as tf

    torch.manual_seed(seed)
    if family == "deepseek_v3":
        config = tf.DeepseekV3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                                     moe_intermediate_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                     num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16,
                                     qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                                     n_group=1, topk_group=1, first_k_dense_replace=1, max_position_embeddings=MAX_POS,
                                     tie_word_embeddings=False)
        cls = tf.DeepseekV3ForCausalLM
    elif family == "bloom":
        config, cls = tf.BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=layers, n_head=4), tf.BloomForCausalLM
    elif family == "mpt":
        config = tf.MptConfig(vocab_size=VOCAB, d_model=HIDDEN, n_layers=layers, n_heads=4, max_seq_len=MAX_POS)
        cls = tf.MptForCausalLM
    else:
        raise ValueError(f"unknown family {family!r}")
    config._attn_implementation = attn
    model = cls(config)
    model.config._attn_implementation = attn
    return model.eval()


class _ChunkedAttention(_SoftmaxAttention):
    """Causal attention inside chunks of 8 tokens (Llama 4's chunked attention): neither causal nor a sliding window."""

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.d).transpose(1, 2)  # [B, Hq, T, d]
        k = self.k_proj(x).view(B, T, self.kv_heads, self.d).transpose(1, 2).repeat_interleave(
            self.heads // self.kv_heads, dim=1)  # [B, Hq, T, d]
        v = self.v_proj(x).view(B, T, self.kv_heads, self.d).transpose(1, 2).repeat_interleave(
            self.heads // self.kv_heads, dim=1)
        pos = torch.arange(T, device=x.device)
        other_chunk = (pos[:, None] // 8) != (pos[None, :] // 8)
        att = ((q @ k.transpose(-2, -1)) * self.scale).masked_fill(other_chunk, float("-inf"))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        y = F.softmax(att, dim=-1) @ v  # [B, Hq, T, d]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def chunked_softmax(layers: int = 2, seed: int = 0) -> TinyDecoder:
    torch.manual_seed(seed)
    return TinyDecoder(lambda: _ChunkedAttention(HIDDEN, 4, 2, MAX_POS), layers=layers).eval()
