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
    result = to_aoti(compiled, example_ids(2, 40), tmp_path / "nano.pt2", inductor_configs=FAST_BUILD, check=False)
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
        tokens = []
        for _ in range(new):
            tokens.append(outs[0][:, -1].argmax(-1, keepdim=True))
            outs = decode(tokens[-1], *outs[1:])
    torch.save((torch.cat(tokens, 1), outs[1]), sys.argv[4])
    assert "hysparse_compile" not in sys.modules
""")


def test_decode_packages_generate_the_tokens_of_compiled_generate(tmp_path):
    """Prefill package (returns the cache) + decode-step package, driven by a greedy loop in a fresh process on a
    left-padded batch: the tokens of `compiled.generate` (transformers' greedy search with the HySparse cache)."""
    compiled = sharp_llama()
    result = to_aoti(compiled, example_ids(2, 40), tmp_path / "llama.pt2", decode=True, inductor_configs=FAST_BUILD)
    prefill, decode = result.files
    assert decode.name == "llama-decode.pt2" and result.check.count("aoti_load_package ok") == 2
    assert "cache" in result.check and not any("hysparse" in op for op in result.ops)
    ids, mask = padded_batch(30, 4, seed=7)
    new = 20  # crosses 16-token blocks and wraps the 16-slot SWA ring
    with torch.no_grad():
        want = compiled.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)[:, 30:]
    torch.save((ids, mask, hf_positions(mask), new), tmp_path / "case.pt")
    run = subprocess.run([sys.executable, "-c", GREEDY, str(prefill), str(decode), str(tmp_path / "case.pt"),
                          str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    tokens, lengths = torch.load(tmp_path / "out.pt")
    assert torch.equal(tokens, want)
    assert lengths.tolist() == [30 + new, 30 - 4 + new]  # present.lengths: real tokens cached per row


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
