"""vLLM serves a HySparse checkpoint exactly as `compiled.generate` computes it (fp32, greedy): prompts of 5-130
tokens (longer than the window, several selection blocks and pages) batched continuously with chunked prefill
(32-token step budget), alone, finishing at different steps, from the prefix cache, and preempted and recomputed
under a tiny KV budget; logprobs to 1e-4.

Models (tests/serving/tiny.py): Llama in paper mode with all four kv_sharing kinds (32-token pages, 16-token
selection blocks), Qwen3 paper mode with head gates (16-token pages, 32-token blocks, a 40-page KV budget), Qwen2
training-free (merged softmax, own caches)."""
import pytest

pytest.importorskip("vllm", reason=__import__("conftest").NO_VLLM)

import engine_run  # noqa: E402
import tiny  # noqa: E402
from conftest import EXACTNESS_RUNS as RUNS  # noqa: E402

LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module")
def served(engines, checkpoints):
    """name -> (vLLM results, compiled.generate's tokens for engine_run.prompts()), one engine per model (the
    references are computed while the engines run)."""
    references = {name: tiny.reference_tokens(checkpoints[name], engine_run.prompts(), engine_run.NEW_TOKENS)
                  for name in RUNS}
    return {name: (engines.result(name), references[name]) for name in RUNS}


@pytest.mark.parametrize("name", list(RUNS))
def test_batched_greedy_tokens_equal_compiled_generate(served, name):
    result, reference = served[name]
    assert result["batched"] == reference


@pytest.mark.parametrize("name", list(RUNS))
def test_each_request_alone_equals_batched(served, name):
    result, _ = served[name]
    assert result["alone"] == result["batched"]


@pytest.mark.parametrize("name", list(RUNS))
def test_requests_finishing_at_different_steps_keep_the_others_tokens(served, name):
    result, reference = served[name]
    assert [len(t) for t in result["staggered"]] == list(engine_run.STAGGERED)
    assert result["staggered"] == [ref[:n] for ref, n in zip(reference, engine_run.STAGGERED)]


@pytest.mark.parametrize("name", list(RUNS))
def test_logprobs_match_the_compiled_model(served, checkpoints, name):
    result, reference = served[name]
    worst = 0.0
    for ids, tokens, logprobs in zip(engine_run.prompts(), result["batched"], result["batched_logprobs"]):
        expected = tiny.reference_logprobs(checkpoints[name], ids, tokens)
        worst = max(worst, max(abs(a - b) for a, b in zip(logprobs, expected)))
    print(f"\n{name}: largest |vLLM logprob - compiled model logprob|: {worst:.2e}")
    assert worst <= LOGPROB_TOL, f"largest |logprob difference| {worst:.2e} > {LOGPROB_TOL}"
    flat = lambda rows: [x for row in rows for x in row]  # noqa: E731
    assert flat(result["alone_logprobs"]) == pytest.approx(flat(result["batched_logprobs"]), abs=LOGPROB_TOL)


def test_prefix_cache_hits_give_the_same_tokens(served):
    result, reference = served["llama"]
    assert sum(result["cached_tokens"]) > 0, "the repeated prompts should have hit the prefix cache"
    assert result["prefix_cached"] == reference


def test_preemption_and_recompute_keep_every_requests_tokens(served, checkpoints):
    result, _ = served["qwen3"]
    assert result["preempt_preemptions"] > 0, "the 40-page budget should have forced preemption"
    prompts = engine_run.prompts(1, engine_run.PREEMPT_LENGTHS)
    assert result["preempt"] == tiny.reference_tokens(checkpoints["qwen3"], prompts, engine_run.PREEMPT_TOKENS)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_the_sparse_attention_changes_tokens_so_the_comparison_can_fail(served, checkpoints, name):
    """The same weights with every layer full (the plain HF model) pick other tokens for some prompt: the match
    above is the HySparse computation's, not an accident of a model whose sparse layers do not matter."""
    import torch
    import transformers

    result, _ = served[name]
    dense = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoints[name]), dtype=torch.float32).eval()
    dense_tokens = tiny.greedy(dense, engine_run.prompts(), engine_run.NEW_TOKENS)
    assert sum(d != t for d, t in zip(dense_tokens, result["batched"])) > 0
