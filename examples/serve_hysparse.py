"""Serve a HySparse checkpoint with vLLM: write a tiny one (random Llama, byte tokenizer made with `tokenizers`, no
downloads), generate from it with vLLM offline, and print the command that serves it over HTTP.

    python examples/serve_hysparse.py ckpt/
    python -m hysparse_compile.serving.vllm serve ckpt/ --dtype float32 --host 127.0.0.1 --port 8000

Needs the `[vllm]` extra in its own environment (docs/serving.md): vLLM's CPU build pins its own torch.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: quicker to start on CPU


def write_checkpoint(directory: Path) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    import hysparse_compile as hs

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=259, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                      bos_token_id=256, eos_token_id=257, pad_token_id=258)
    model = transformers.LlamaForCausalLM(config).eval()
    compiled = hs.compile(model, hs.Schedule.from_pattern("FSSS", block_size=16, topk=64, window=32))
    compiled.save_pretrained(directory)  # config.json, schedule.json, hysparse.json, model.safetensors

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257, "<pad>": 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    fast.save_pretrained(str(directory))


def main() -> None:
    directory = Path(sys.argv[1] if len(sys.argv) > 1 else "hysparse-tiny")
    write_checkpoint(directory)
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(directory), dtype="float32", enforce_eager=True, max_model_len=512,
              kv_cache_memory_bytes=64 * 2**20)
    outputs = llm.generate(["The sparse layers read", "Hello"], SamplingParams(temperature=0, max_tokens=16))
    for out in outputs:
        print(f"{out.prompt!r} -> token ids {list(out.outputs[0].token_ids)}")
    print(f"\nserve it: python -m hysparse_compile.serving.vllm serve {directory} --dtype float32 "
          f"--host 127.0.0.1 --port 8000")


if __name__ == "__main__":
    main()
