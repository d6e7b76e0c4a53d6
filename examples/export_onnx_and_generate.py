"""Compile a HF Llama, export it to ONNX with its decode step, and generate with onnxruntime alone.

    python examples/export_onnx_and_generate.py [OUT_DIR]

1. Build a small Llama from a config (random weights, no downloads) and compile it with a 1:3 HySparse schedule.
2. `to_onnx(..., decode=True)`: `llama.onnx` (prefill: logits and the HySparse KV cache) and `llama-decode.onnx`
   (one token in, the cache one token longer out), standard ONNX ops only.
3. Greedy generation from a left-padded batch with onnxruntime: the prefill once, then one decode-step call per
   token, each call's `present.*` outputs fed back as the next call's `past.*` inputs. No PyTorch in the loop.
4. The same generation with the compiled model in PyTorch (`compiled.generate`, transformers' greedy search with the
   HySparse cache): the tokens must be equal (exit code 1 if not).
"""
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers

import hysparse_compile as hs
from hysparse_compile.export import to_onnx

PROMPT, NEW = 48, 24


def build_model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                      bos_token_id=None, eos_token_id=None, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).eval()
    # Random weights give near-uniform attention: every block scores the same to the last bit, and which block a
    # token selects is decided by rounding (onnxruntime sums in another order than PyTorch). Scaling the query and
    # key projections makes attention peaked, as in a trained model, so the selections are the weights' choice.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return model


def generate_onnxruntime(prefill_path, decode_path, ids, mask):
    prefill = ort.InferenceSession(str(prefill_path), providers=["CPUExecutionProvider"])
    decode = ort.InferenceSession(str(decode_path), providers=["CPUExecutionProvider"])
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)  # as transformers' generate numbers left-padded prompts
    outs = prefill.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": positions})
    past_names = [o.name.replace("present.", "past.") for o in decode.get_outputs()][1:]
    tokens = []
    for _ in range(NEW):
        tokens.append(outs[0][:, -1].argmax(-1)[:, None])  # greedy
        outs = decode.run(None, {"input_ids": tokens[-1], **dict(zip(past_names, outs[1:]))})
    return np.concatenate(tokens, axis=1), outs[1]


def main(out_dir: Path) -> int:
    model = build_model()
    schedule = hs.Schedule.from_pattern("FSSS", block_size=16, topk=64, window=32)
    compiled = hs.compile(model, schedule)
    print(f"compiled {type(model).__name__} with schedule {schedule.pattern}")

    ids = torch.randint(0, 256, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :10] = 0  # the second prompt is 10 tokens shorter: left padding
    t0 = time.perf_counter()
    result = to_onnx(compiled, ids, out_dir / "llama.onnx", decode=True)
    print(f"exported in {time.perf_counter() - t0:.1f} s:")
    for f in result.files:
        print(f"  {f} ({f.stat().st_size / 2**20:.2f} MiB)")
    print(f"  check: {result.check}")

    t0 = time.perf_counter()
    got, lengths = generate_onnxruntime(*result.files, ids.numpy(), mask.numpy())
    print(f"onnxruntime: {NEW} tokens x 2 rows in {time.perf_counter() - t0:.2f} s; cache lengths now "
          f"{lengths.tolist()}")
    with torch.no_grad():
        want = compiled.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)[:, PROMPT:].numpy()
    for row in range(2):
        print(f"row {row}: onnxruntime {got[row].tolist()}")
        print(f"       PyTorch     {want[row].tolist()}")
    same = np.array_equal(got, want)
    print("PASS: the same tokens" if same else "FAIL: the tokens differ")
    return 0 if same else 1


if __name__ == "__main__":
    if len(sys.argv) > 1:
        Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
        sys.exit(main(Path(sys.argv[1])))
    with tempfile.TemporaryDirectory() as tmp:
        sys.exit(main(Path(tmp)))
