"""bench/bench_kernels.py's `trained` selection: the paper miniature's selections.npz as kernel indices."""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: `bench` is a package there
from bench import bench_kernels  # noqa: E402


def test_trained_selections_become_kernel_indices_per_kv_head(tmp_path):
    rng = np.random.default_rng(0)
    T, nsel = 300, 4
    layers = {}
    for name in ("run_a/layer0_indices", "run_a/layer3_indices", "run_b/layer1_indices"):
        rows = np.full((1, T, nsel), -1, dtype=np.int16)
        for t in range(T):
            visible = t // 16 + 1
            pick = np.sort(rng.choice(visible, size=min(nsel, visible), replace=False))
            rows[0, t, :len(pick)] = pick
        layers[name] = rows
    np.savez(tmp_path / "selections.npz", summary_json="{}", **layers)
    idx, why = bench_kernels.trained_selection(tmp_path / "selections.npz", B=2, Hkv=4, T=250, nsel=nsel,
                                               device="cpu")
    assert idx.shape == (2, 4, 250, nsel) and idx.dtype == torch.int32 and "3 layers" in why
    names = list(layers)
    for h in range(4):  # head h is stored layer h mod 3, cut to T
        assert np.array_equal(idx[1, h].numpy(), layers[names[h % 3]][0, :250])
    idx, why = bench_kernels.trained_selection(tmp_path / "selections.npz", B=1, Hkv=2, T=400, nsel=nsel,
                                               device="cpu")
    assert idx is None and "T=400 <= 300" in why


def test_gpu_arguments_with_a_trained_file_parse(tmp_path):
    """The command line docs/fidelity.md gives (it failed on the GPU once: the trained flag had swallowed the GPU
    defaults)."""
    args = bench_kernels.parse_args(["--ops", "sparse", "--backends", "triton", "--seqlens", "4096", "--topk", "512",
                                     "--selections", "random,tile,trained", "--trained", str(tmp_path / "s.npz"),
                                     "--orders", "token,block"])
    assert args.selections == ["random", "tile", "trained"] and args.topk == 512 and args.seqlens == [4096]
    assert args.decode_batches == [1, 8] and args.stack_T == 32768 and args.base == "sdpa_cudnn"
    args = bench_kernels.parse_args(["--trained", str(tmp_path / "s.npz")])  # the flag adds the row
    assert args.selections[-1] == "trained"


def test_recompute_mode_times_the_backward_as_the_model_runs_it():
    """`--recompute`: the forward keeps no branch outputs and the backward gets `out` and them empty (what the
    op's autograd passes by default); plain fwd+bwd keeps them (save_branches=True)."""
    from types import SimpleNamespace

    seen = []

    class Impl:
        def sparse_attention_fwd(self, *a, **kw):
            seen.append(("fwd", a[13]))  # save_branches
            return torch.ones(2), torch.ones(2), torch.ones(3) if a[13] else torch.empty(0)

        def sparse_attention_bwd(self, dout, *a, **kw):
            seen.append(("bwd", a[9].numel(), a[11].numel()))  # out, branch outputs

    s = {n: torch.zeros(1, 2, 4, 8) for n in ("q", "k_own", "v_own", "k_sh", "v_sh", "gate_sp", "gate_swa", "dout")}
    s["sinks"] = None
    rotor = SimpleNamespace(sets=[s], i=0, next=lambda: s)
    args = SimpleNamespace(block=16, window=16)
    for recompute, want in ((False, [("fwd", True), ("bwd", 2, 3)]), (True, [("fwd", False), ("bwd", 0, 0)])):
        seen.clear()
        fn, _ = bench_kernels.sparse_call(Impl(), rotor, [None], args, True, recompute=recompute)
        fn()
        assert seen == want
