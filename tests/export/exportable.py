"""The small compiled models the export tests share (built once per session: compiling is the slow part)."""
import functools

import torch
from models import sharpen
from oracle_model import randomize_new_weights

BLOCK, TOPK, WINDOW = 16, 32, 16  # 2 blocks selected per token: at T = 1000 (63 blocks) selection is real


def sharp_original(layers: int = 2):
    """A tiny HF Llama (GQA 4/2, head dim 16) whose query/key projections are scaled up so that attention is peaked
    and block scores are far apart: with random weights at the usual scale attention is near-uniform, block scores
    tie to the last bit, and which block wins would be decided by rounding (ONNX Runtime and PyTorch order their
    sums differently). A new model per call, same weights."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                            tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)  # no EOS: no early stop
    config._attn_implementation = "sdpa"
    model = tf.LlamaForCausalLM(config).eval()
    return sharpen(model, 8.0)


@functools.lru_cache(maxsize=None)
def sharp_pair(pattern: str = "FS", mode: str = "paper", **options):
    """(original, compiled) for `sharp_original` compiled with `pattern` (BLOCK, TOPK, WINDOW), the new weights
    random (`randomize_new_weights`). Shared by the session: do not modify."""
    import hysparse_compile as hs

    original = sharp_original(len(pattern))
    schedule = hs.Schedule.from_pattern(pattern, block_size=BLOCK, topk=TOPK, window=WINDOW, mode=mode, **options)
    compiled = hs.compile(original, schedule)
    randomize_new_weights(compiled)
    return original, compiled


def sharp_llama(pattern: str = "FS"):
    """The compiled `sharp_pair(pattern)` (paper mode, random gates and sinks)."""
    return sharp_pair(pattern)[1]


@functools.lru_cache(maxsize=None)
def nano(pattern: str = "FS"):
    """A compiled nanoGPT (no attention_mask input, plain tensor output)."""
    import models

    import hysparse_compile as hs

    schedule = hs.Schedule.from_pattern(pattern, block_size=BLOCK, topk=TOPK, window=WINDOW)
    return hs.compile(models.nano_gpt(layers=len(pattern), heads=4, kv_heads=2), schedule)


def example_ids(batch=2, seq=40, seed=0):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def padded_batch(seq, pad, seed=1):
    """Token ids [2, seq] and an attention mask whose second row is left-padded by `pad`."""
    ids = example_ids(2, seq, seed)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask


def hf_positions(mask):
    """Position ids as transformers' generate makes them for left-padded rows: cumsum(mask) - 1, pads at 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)
