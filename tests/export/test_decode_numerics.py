"""The exported prefill + decode-step files compute, step by step, the logits of the compiled model's own cached
decoding (`compiled(ids, past_key_values=cache, use_cache=True)`), on a model whose gates and sinks are random
(oracle_model.randomize_new_weights) and a left-padded batch: standard ONNX in onnxruntime (the ATen decompositions of
the four ops), and the custom domain run by `onnx.reference` with nodes implemented from docs/onnx_ops.md on the
float64 oracle (oracle_onnx.py), not the package's own Python ops. Tokens are teacher-forced (the same random ids
for every runtime), so a wrong step cannot hide behind an unchanged argmax."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
from exportable import example_ids, hf_positions, padded_batch, sharp_llama, sharp_pair
from oracle_onnx import oracle_session

from hysparse_compile.runtime import HySparseCache

# rows of 30 and 8 real tokens, then 20 steps. Row 0 crosses blocks 32 and 48 (16-token blocks, 2 selected of up to
# 4) and wraps the 16-slot SWA ring; row 1 starts with fewer tokens than a block, top-k and the window (a ring with
# empty slots, -1 padded selections) and crosses block 16.
PROMPT, PAD, STEPS = 30, 22, 20
TOL = 1e-4  # fp32 logits, relative to the largest; measured <= 7.6e-7 (see test docstrings)


def rel(got, want) -> float:
    got, want = torch.as_tensor(np.asarray(got)).double(), want.double()
    return ((got - want).abs().max() / want.abs().max()).item()


def _cached_case(compiled):
    """The prompt, its mask, the teacher-forced tokens and the compiled model's cached logits and final cache."""
    ids, mask = padded_batch(PROMPT, PAD, seed=7)
    new = example_ids(2, STEPS, seed=11)
    cache = HySparseCache(compiled)
    full_mask = mask
    with torch.no_grad():
        prefill = compiled(ids, attention_mask=mask, position_ids=hf_positions(mask), past_key_values=cache,
                           use_cache=True).logits
        steps = []
        for s in range(STEPS):
            full_mask = torch.cat([full_mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            positions = cache.lengths.view(2, 1).clone()  # the real tokens before the new one
            steps.append(compiled(new[:, s:s + 1], attention_mask=full_mask, position_ids=positions,
                                  past_key_values=cache, use_cache=True).logits)
    return dict(ids=ids, mask=mask, new=new, prefill=prefill, steps=torch.cat(steps, 1), cache=cache)


@pytest.fixture(scope="module")
def case():
    return _cached_case(sharp_llama())


def _loop(prefill_run, decode_run, decode_outputs, case):
    """Prefill, then STEPS decode calls feeding each call's `present.*` back as `past.*`: -> prefill logits, step
    logits [2, STEPS, V], the last call's outputs (name -> array)."""
    ids, mask = case["ids"], case["mask"]
    outs = prefill_run({"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                        "position_ids": hf_positions(mask).numpy()})
    prefill = outs[0]
    past = [n.replace("present.", "past.") for n in decode_outputs][1:]
    steps = []
    for s in range(STEPS):
        outs = decode_run({"input_ids": case["new"][:, s:s + 1].numpy(), **dict(zip(past, outs[1:]))})
        steps.append(outs[0])
    return prefill, np.concatenate(steps, 1), dict(zip(decode_outputs, outs))


def _standard_run(files, case):
    prefill, decode = (ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]) for f in files)
    names = [o.name for o in decode.get_outputs()]
    return _loop(lambda feed: prefill.run(None, feed), lambda feed: decode.run(None, feed), names, case)


def _custom_run(files, case):
    prefill, decode = oracle_session(files[0]), oracle_session(files[-1])
    return _loop(lambda feed: prefill.run(None, {n: feed[n] for n in prefill.input_names}),
                 lambda feed: decode.run(None, feed), decode.output_names, case)


@pytest.fixture(scope="module")
def standard_run(standard_file, case):
    return _standard_run(standard_file.files, case)


@pytest.fixture(scope="module")
def custom_run(custom_file, case):
    return _custom_run(custom_file.files, case)


def _real(logits, mask):
    """The logits of the real (non-pad) tokens, rows concatenated."""
    logits = torch.as_tensor(np.asarray(logits))
    return torch.cat([logits[b, mask[b].bool()] for b in range(mask.shape[0])])


def test_standard_prefill_file_gives_the_cached_prefill_logits(standard_run, case):
    assert rel(_real(standard_run[0], case["mask"]), _real(case["prefill"], case["mask"])) <= TOL


def test_standard_decode_file_gives_the_cached_logits_of_compiled_at_every_step(standard_run, case):
    """onnxruntime (decompositions of full_attention_decode / sparse_attention_decode) against the runtime's decode
    ops, 20 steps of a left-padded batch (measured max 7.6e-7)."""
    errors = [rel(standard_run[1][:, s], case["steps"][:, s]) for s in range(STEPS)]
    assert max(errors) <= TOL, errors


def test_standard_decode_file_returns_the_cache_the_runtime_keeps(standard_run, case):
    """present.* after the last step: the full layer's K/V at slots 0 .. lengths[b]-1 and the sparse layer's ring
    equal the HySparseCache's (what a runtime feeds back is what the PyTorch runtime would hold)."""
    outs, cache = standard_run[2], case["cache"]
    lengths = cache.lengths.tolist()
    assert outs["present.lengths"].tolist() == lengths == [PROMPT + STEPS, PROMPT - PAD + STEPS]
    for b, n in enumerate(lengths):
        for name, want in (("key", cache.keys[0]), ("value", cache.values[0])):
            assert rel(outs[f"present.0.{name}"][b, :, :n], want[b, :, :n]) <= 1e-6
    assert rel(outs["present.1.key"], cache.keys[1]) <= 1e-6 and rel(outs["present.1.value"], cache.values[1]) <= 1e-6


def test_custom_prefill_file_with_oracle_nodes_gives_the_cached_prefill_logits(custom_run, case):
    assert rel(_real(custom_run[0], case["mask"]), _real(case["prefill"], case["mask"])) <= TOL


def test_custom_decode_file_with_oracle_nodes_gives_the_cached_logits_of_compiled_at_every_step(custom_run, case):
    """The FullAttentionDecode / SparseAttentionDecode nodes computed by the float64 oracle from their inputs and
    attributes (docs/onnx_ops.md), against the runtime's decode ops: the exporter wires every input (ring, cache
    length, gates, sinks, flags) as the contract says (measured max 4.7e-7)."""
    errors = [rel(custom_run[1][:, s], case["steps"][:, s]) for s in range(STEPS)]
    assert max(errors) <= TOL, errors


# ---------------------------------------------------------------------------------------------- training-free
@pytest.fixture(scope="module")
def training_free(tmp_path_factory):
    """The training-free model (merge: one softmax over the selected blocks and the window of the layer's own K/V,
    which the cache stores whole): its cached logits and a decode file pair per ops kind, exported on first use (the
    standard pair runs by default: its capture once failed on the linear cache's symbolic length; custom: --full)."""
    from hysparse_compile.export import to_onnx

    compiled = sharp_pair("FS", "training_free")[1]
    folder = tmp_path_factory.mktemp("training_free")
    files = {}

    def export(ops):
        if ops not in files:
            files[ops] = to_onnx(compiled, example_ids(1, 40), folder / f"tf-{ops}.onnx", ops=ops, decode=True).files
        return files[ops]

    return dict(case=_cached_case(compiled), files=export)


@pytest.mark.parametrize("ops", ["standard", pytest.param("custom", marks=pytest.mark.full_grid)])
def test_training_free_decode_files_give_the_cached_logits_of_compiled_at_every_step(training_free, ops):
    case = training_free["case"]
    prefill, steps, _ = (_standard_run if ops == "standard" else _custom_run)(training_free["files"](ops), case)
    assert rel(_real(prefill, case["mask"]), _real(case["prefill"], case["mask"])) <= TOL
    errors = [rel(steps[:, s], case["steps"][:, s]) for s in range(STEPS)]
    assert max(errors) <= TOL, errors
