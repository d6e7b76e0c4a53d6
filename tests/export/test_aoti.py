"""to_aoti: an AOTInductor package with dynamic batch and sequence, loaded in a fresh Python process (which never
imports hysparse_compile) and matching the eager compiled model. On CPU the HySparse ops lower through their ATen
decompositions."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from exportable import example_ids, hf_positions, nano, padded_batch, sharp_llama

from hysparse_compile.export import to_aoti

FAST_BUILD = {"aot_inductor.compile_wrapper_opt_level": "O0", "cpp.simdlen": 0}  # tests: a quicker C++ build

LOADER = textwrap.dedent("""
    import sys, torch
    assert "hysparse_compile" not in sys.modules
    runner = torch._inductor.aoti_load_package(sys.argv[1])
    cases = torch.load(sys.argv[2])
    with torch.no_grad():
        torch.save([runner(ids) for ids in cases], sys.argv[3])
    assert "hysparse_compile" not in sys.modules
""")


def test_package_loads_in_a_fresh_process_and_matches_eager(tmp_path):
    compiled = nano()
    result = to_aoti(compiled, example_ids(1, 40), tmp_path / "nano.pt2", inductor_configs=FAST_BUILD, check=False)
    assert result.files == (tmp_path / "nano.pt2",) and result.size > 0
    assert not any("hysparse" in op for op in result.ops)  # decomposed to ATen
    cases = [example_ids(3, 77, seed=1), example_ids(1, 5, seed=2), example_ids(2, 128, seed=3)]
    torch.save(cases, tmp_path / "cases.pt")
    run = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / "nano.pt2"), str(tmp_path / "cases.pt"),
                          str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for ids, got in zip(cases, torch.load(tmp_path / "out.pt")):
        with torch.no_grad():
            want = compiled(ids)
        assert got.shape == want.shape
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-4


GREEDY = textwrap.dedent("""
    import sys, torch
    prefill = torch._inductor.aoti_load_package(sys.argv[1])
    decode = torch._inductor.aoti_load_package(sys.argv[2])
    ids, mask, positions, new = torch.load(sys.argv[3])
    with torch.no_grad():
        outs = prefill(ids, mask, positions)
        first = outs[0]
        tokens, logits = [], []
        for _ in range(new):
            tokens.append(outs[0][:, -1].argmax(-1, keepdim=True))
            outs = decode(tokens[-1], *outs[1:])
            logits.append(outs[0])
    torch.save((torch.cat(tokens, 1), outs[1], first, torch.cat(logits, 1)), sys.argv[4])
    assert "hysparse_compile" not in sys.modules
""")
PROMPT, PAD, NEW = 30, 4, 20  # 20 new tokens cross 16-token blocks and wrap the 16-slot SWA ring


@pytest.fixture(scope="module")
def greedy_run(tmp_path_factory):
    """The prefill + decode-step packages of the compiled Llama (random gates and sinks), driven by a greedy loop in
    a fresh process on a left-padded batch: the build and what the loop saw (tokens, lengths, prefill logits, the
    logits of every decode step)."""
    tmp_path = tmp_path_factory.mktemp("aoti")
    compiled = sharp_llama()
    result = to_aoti(compiled, example_ids(1, 40), tmp_path / "llama.pt2", decode=True, inductor_configs=FAST_BUILD)
    ids, mask = padded_batch(PROMPT, PAD, seed=7)
    torch.save((ids, mask, hf_positions(mask), NEW), tmp_path / "case.pt")
    prefill, decode = result.files
    run = subprocess.run([sys.executable, "-c", GREEDY, str(prefill), str(decode), str(tmp_path / "case.pt"),
                          str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    tokens, lengths, prefill_logits, step_logits = torch.load(tmp_path / "out.pt")
    return dict(result=result, ids=ids, mask=mask, tokens=tokens, lengths=lengths, prefill_logits=prefill_logits,
                step_logits=step_logits)


def test_decode_packages_generate_the_tokens_of_compiled_generate(greedy_run):
    """Prefill package (returns the cache) + decode-step package, driven by a greedy loop in a fresh process on a
    left-padded batch: the tokens of `compiled.generate` (transformers' greedy search with the HySparse cache)."""
    result = greedy_run["result"]
    prefill, decode = result.files
    assert decode.name == "llama-decode.pt2" and result.check.count("aoti_load_package ok") == 2
    assert "cache" in result.check and not any("hysparse" in op for op in result.ops)
    with torch.no_grad():
        want = sharp_llama().generate(greedy_run["ids"], attention_mask=greedy_run["mask"], max_new_tokens=NEW,
                                      do_sample=False)[:, PROMPT:]
    assert torch.equal(greedy_run["tokens"], want)
    assert greedy_run["lengths"].tolist() == [PROMPT + NEW, PROMPT - PAD + NEW]  # present.lengths: real tokens per row


def test_decode_packages_give_the_cached_logits_of_compiled_at_every_step(greedy_run):
    """The logits the packages computed, prefill and each decode step, against the compiled model's cached call
    (`compiled(ids, past_key_values=cache, use_cache=True)`) fed the same tokens: <= 1e-4 relative (measured
    4.9e-7); a swapped gate, a gate of another head or a dropped sink in the decode decompositions would be off by
    tens of percent (random gates and sinks)."""
    from hysparse_compile.runtime import HySparseCache

    compiled, ids, mask = sharp_llama(), greedy_run["ids"], greedy_run["mask"]
    cache = HySparseCache(compiled)
    real = mask.bool()
    rel = lambda got, want: float((got - want).abs().max() / want.abs().max())  # noqa: E731
    with torch.no_grad():
        want = compiled(ids, attention_mask=mask, position_ids=hf_positions(mask), past_key_values=cache,
                        use_cache=True).logits
        assert rel(greedy_run["prefill_logits"][real], want[real]) <= 1e-4
        errors = []
        for s in range(NEW):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            want = compiled(greedy_run["tokens"][:, s:s + 1], attention_mask=mask,
                            position_ids=cache.lengths.view(-1, 1).clone(), past_key_values=cache,
                            use_cache=True).logits
            errors.append(rel(greedy_run["step_logits"][:, s:s + 1], want))
    assert max(errors) <= 1e-4, errors


@pytest.mark.parametrize("path, words", [("model.so", "must end in .pt2"), ("missing/model.pt2", "does not exist")])
def test_bad_paths_are_refused(tmp_path, path, words):
    with pytest.raises(ValueError, match=words):
        to_aoti(nano(), example_ids(), tmp_path / path)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(kernels="cuda"), ValueError, "kernels must be 'triton' .* or 'aten'"),
    (dict(decode=1), TypeError, "decode must be True or False"),
])
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, kwargs, error, words):
    with pytest.raises(error, match=words):
        to_aoti(nano(), example_ids(), tmp_path / "m.pt2", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_a_model_that_is_not_compiled_is_refused(tmp_path):
    with pytest.raises(TypeError, match="compiled must be a compiled HySparse model"):
        to_aoti(torch.nn.Linear(2, 2), example_ids(), tmp_path / "m.pt2")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton kernels run on a CPU only under TRITON_INTERPRET=1")
def test_triton_ops_of_cuda_packages_compute_the_ops(gen):
    """The triton_op launchers CUDA packages are built from (run eagerly here, fp32: the interpreter's bf16 dots
    are wrong) give the reference backend's results."""
    from hysparse_compile.export import aoti_triton  # noqa: F401  (registers torch.ops.hysparse_aot.*)
    from hysparse_compile.kernels import reference as R

    T = 37  # three blocks, the last one partial (the interpreter is slow: one small case)
    q, k, v, k_own, v_own = (torch.randn(1, h, T, 16, generator=gen) for h in (4, 2, 2, 2, 2))
    out, indices = torch.ops.hysparse_aot.full_attention(q, k, v, 16, 32, 0.25)
    want_out, want_indices, _, _ = R.full_attention_fwd(q, k, v, 16, 32, 0.25, False)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    gs, gw, sinks = torch.rand(1, 4, T, 16, generator=gen), torch.rand(1, 4, T, 1, generator=gen), torch.randn(4)
    for args in ((q, k_own, v_own, k, v, indices, gs, gw, sinks, 16, 8, 0.25, False),
                 (q, k, v, k, v, indices, None, None, sinks, 16, 8, 0.25, True)):  # paper mode, training-free merge
        torch.testing.assert_close(torch.ops.hysparse_aot.sparse_attention(*args),
                                   R.sparse_attention_fwd(*args, False)[0], rtol=1e-5, atol=1e-5)
