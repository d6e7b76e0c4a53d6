"""Runs one vLLM engine in its own process and writes what the serving tests check as JSON (vLLM keeps process-wide
state, so each engine gets a fresh interpreter; the engine core runs in-process: VLLM_ENABLE_V1_MULTIPROCESSING=0).

    python engine_run.py exactness CKPT OUT.json --block-size 32 --max-model-len 160
    python engine_run.py exactness+preemption CKPT OUT.json --block-size 16 --blocks 40 --max-model-len 160
    python engine_run.py capacity CKPT OUT.json --block-size 32 --max-model-len 8192
"""
from __future__ import annotations

import argparse
import json
import os
import random

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

PROMPT_LENGTHS = (5, 23, 40, 77, 130)  # window 16-24 and blocks of 16-32 tokens: most prompts span several of both
NEW_TOKENS = 12
STAGGERED = (3, 12, 7, 12, 1)  # max_tokens per request in the run where requests finish at different steps
PREEMPT_LENGTHS, PREEMPT_TOKENS = (20, 22, 24, 26, 28, 30, 32, 34), 40  # outgrow a tiny KV budget while decoding


def prompts(seed: int = 0, lengths=PROMPT_LENGTHS) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(n)] for n in lengths]


def _tokens(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


def _logprobs(outputs):
    return [[lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outputs]


def _counter(llm, name: str) -> float:
    return sum(getattr(m, "value", 0) or 0 for m in llm.get_metrics() if m.name == name)


def exactness(llm, result: dict) -> None:
    from vllm import SamplingParams

    ps = [{"prompt_token_ids": p} for p in prompts()]
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=1)
    alone = []
    for p in ps:  # one request at a time, nothing cached
        llm.reset_prefix_cache()
        alone += llm.generate([p], greedy, use_tqdm=False)
    result["alone"], result["alone_logprobs"] = _tokens(alone), _logprobs(alone)
    llm.reset_prefix_cache()
    before = _counter(llm, "vllm:num_preemptions")
    batched = llm.generate(ps, greedy, use_tqdm=False)  # continuous batching, chunked prefill, tight KV budget
    result["preemptions"] = _counter(llm, "vllm:num_preemptions") - before
    result["batched"], result["batched_logprobs"] = _tokens(batched), _logprobs(batched)
    llm.reset_prefix_cache()
    staggered = [SamplingParams(temperature=0, max_tokens=n, min_tokens=n) for n in STAGGERED]
    result["staggered"] = _tokens(llm.generate(ps, staggered, use_tqdm=False))
    again = llm.generate(ps, greedy, use_tqdm=False)  # the same prompts: prefix-cache hits
    result["prefix_cached"] = _tokens(again)
    result["cached_tokens"] = [o.num_cached_tokens or 0 for o in again]


def preemption(llm, result: dict) -> None:
    from vllm import SamplingParams

    llm.reset_prefix_cache()
    ps = [{"prompt_token_ids": p} for p in prompts(1, PREEMPT_LENGTHS)]
    before = _counter(llm, "vllm:num_preemptions")
    out = llm.generate(ps, SamplingParams(temperature=0, max_tokens=PREEMPT_TOKENS, min_tokens=PREEMPT_TOKENS),
                       use_tqdm=False)
    result["preempt_preemptions"] = _counter(llm, "vllm:num_preemptions") - before
    result["preempt"] = _tokens(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["exactness", "exactness+preemption", "capacity"])
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=None, help="num_gpu_blocks_override (a tiny KV budget)")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--max-num-batched-tokens", type=int, default=32)
    parser.add_argument("--kv-bytes", type=int, default=64 * 2**20, help="KV cache memory budget in bytes")
    args = parser.parse_args()

    from vllm import LLM

    llm = LLM(model=args.model, dtype="float32", enforce_eager=True, block_size=args.block_size,
              max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=8,
              num_gpu_blocks_override=args.blocks, kv_cache_memory_bytes=args.kv_bytes, disable_log_stats=False,
              seed=0)
    cache = llm.llm_engine.vllm_config.cache_config
    result = {"num_blocks": cache.num_gpu_blocks, "max_concurrency": cache.kv_cache_max_concurrency,
              "kv_cache_tokens": cache.kv_cache_size_tokens, "kv_cache_bytes": cache.kv_cache_memory_bytes,
              "page": cache.block_size}
    if args.scenario.startswith("exactness"):
        exactness(llm, result)
    if args.scenario.endswith("preemption"):
        preemption(llm, result)
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
