"""Tiny HySparse checkpoints for the serving tests: random HF models (head_dim 32), compiled, gates and sinks moved
off their initial values, written with `save_pretrained`, plus a byte-level tokenizer made with `tokenizers` (no
downloads) whose tokenizer_config.json carries a chat template."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

import hysparse_compile as hs

SPECIALS = ["<s>", "</s>", "<pad>"]
VOCAB = 256 + len(SPECIALS)
BOS, EOS, PAD = 256, 257, 258
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")

CAPACITY_CONTEXT = 16384  # max_model_len of the capacity engines: vLLM reports max concurrency at this context
CAPACITY_BUDGET = 256 * 2**20  # KV cache bytes both capacity engines get
CAPACITY_PAGE = 32
CAPACITY_STEP_TOKENS = 32  # max_num_batched_tokens: vLLM reserves this many in-flight tokens per window layer
CAPACITY_ENGINE_ARGS = ("--block-size", str(CAPACITY_PAGE), "--max-model-len", str(CAPACITY_CONTEXT),
                        "--max-num-batched-tokens", str(CAPACITY_STEP_TOKENS), "--kv-bytes", str(CAPACITY_BUDGET))

# name -> (HF family, config kwargs, schedule kwargs). Selection blocks and vLLM pages differ on purpose: the Llama
# engine runs with 32-token pages (two selection blocks per page), the Qwen3 one with 16-token pages (two pages per
# selection block).
MODELS = {
    # paper mode with every kv_sharing kind in one model: 1 sparse_branch+SWA, 2 both, 4 none, 5 swa=False
    "llama": ("llama", dict(num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2),
              dict(pattern="FSSFSS", block_size=16, topk=32, window=24,
                   overrides={2: {"kv_sharing": "both"}, 4: {"kv_sharing": "none"}, 5: {"swa": False}})),
    "qwen3": ("qwen3", dict(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=32),
              dict(pattern="FSSS", block_size=32, topk=64, window=20, gate="head")),
    "qwen2": ("qwen2", dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2),
              dict(pattern="FSS", block_size=16, topk=32, window=16, mode="training_free")),
    # the capacity pair (test_vllm_capacity.py): 2 full + 6 sparse layers, the paper's window of 128
    "capacity": ("llama", dict(num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=CAPACITY_CONTEXT),
                 dict(pattern="FSSS FSSS", block_size=64, topk=256, window=128)),
}


def hf_model(family: str, seed: int = 0, **overrides):
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, max_position_embeddings=1024,
                  bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False)
    common.update(overrides)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[family]
    torch.manual_seed(seed)
    config = cls[0](**common)
    model = cls[1](config).eval()
    with torch.no_grad():  # larger weights than HF's 0.02 init, so that attention is not uniform
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_(4.0)
    return model


def write_tokenizer(directory: Path) -> None:
    """A byte-level tokenizer (one token per byte, ids 0..255) and three special tokens, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab.update({tok: 256 + i for i, tok in enumerate(SPECIALS)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(directory))


def build(name: str, directory: Path) -> Path:
    """Compile the named tiny model, randomize its gates and sinks, and save it (with a tokenizer) to directory."""
    family, config, schedule = MODELS[name]
    schedule = dict(schedule)
    model = hf_model(family, **config)
    compiled = hs.compile(model, hs.Schedule.from_pattern(schedule.pop("pattern"), **schedule))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for key, p in compiled.named_parameters():
            if ".hysparse." in key:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    directory.mkdir(parents=True, exist_ok=True)
    compiled.save_pretrained(directory)
    write_tokenizer(directory)
    config_path = directory / "config.json"
    cfg = json.loads(config_path.read_text())
    assert cfg["architectures"][0].endswith("ForCausalLM"), cfg["architectures"]
    return directory


@functools.lru_cache(maxsize=None)
def compiled_model(directory: Path):
    """`hs.from_pretrained(directory)` in float32, built once per checkpoint."""
    return hs.from_pretrained(directory, dtype=torch.float32)


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """ids, attention_mask [B, T]: the prompts left-padded with PAD."""
    T = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of exactly max_new_tokens (EOS suppressed until then, as vLLM's min_tokens does), all
    prompts in one left-padded batch (each row of which equals the prompt alone: docs/runtime.md)."""
    ids, mask = left_padded(prompts)
    with torch.no_grad():
        y = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                           do_sample=False, pad_token_id=PAD)
    return y[:, ids.shape[1]:].tolist()


def reference_tokens(directory: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy tokens of `compiled.generate` (fp32): the exactness target."""
    return greedy(compiled_model(Path(directory)), prompts, max_new_tokens)


def strip_hysparse(directory: Path, out: Path) -> Path:
    """The same weights as an ordinary HF checkpoint (no hysparse.json, schedule.json or gate/sink weights): vLLM
    serves it with every layer full, through its own attention."""
    import shutil

    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    for f in directory.iterdir():
        if f.name not in ("hysparse.json", "schedule.json", "model.safetensors"):
            shutil.copy(f, out / f.name)
    weights = {k: v for k, v in load_file(str(directory / "model.safetensors")).items() if ".hysparse." not in k}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def reference_logprobs(directory: Path, ids: list[int], continuation: list[int]) -> list[float]:
    """Log-probability of each continuation token under the compiled model (fp32, one full-sequence forward)."""
    compiled = compiled_model(Path(directory))
    x = torch.tensor([ids + continuation])
    with torch.no_grad():
        logits = compiled(x).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return [logp[len(ids) - 1 + i, tok].item() for i, tok in enumerate(continuation)]
