"""Training a compiled model under torch.distributed: DDP and FSDP2 (`fully_shard`) on 2 CPU processes (gloo).

Each process compiles the same model, takes its half of a global batch and trains a few steps; the losses (averaged
over the two ranks) and the final weights must equal single-process training on the whole batch. FSDP2 shards every
decoder layer and then the root, the usual recipe: the compiled model runs one flat graph, so this exercises
`hysparse_compile/fsdp.py` (each sharded layer becomes a real module call so FSDP's hooks gather its parameters).
"""
import datetime
import os

import pytest
import torch
import torch.nn.functional as F

dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available in this torch build",
                allow_module_level=True)

import models  # noqa: E402

WORLD = 2
STEPS = 3
BATCH, SEQ = 4, 40  # global batch; each rank gets BATCH // WORLD rows
CASES = {  # model -> (optimizer, ways of running besides the single-process reference)
    "llama": ("adamw", ("ddp", "fsdp_layers")),  # HF Llama, loss through labels
    "nano": ("sgd", ("ddp", "fsdp_layers", "fsdp_root")),  # nanoGPT, logits out, loss here
}


def _compiled(name: str):
    import hysparse_compile as hs

    model = models.hf_model("llama", "sdpa", layers=4) if name == "llama" else models.nano_gpt(layers=4)
    schedule = hs.Schedule.from_pattern("FSSS", block_size=16, topk=32, window=16)
    compiled = hs.compile(model, schedule, gate_init=0.01, sink_init=0.1)
    return compiled.train()


def _batch():
    return torch.randint(0, models.VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))


def _loss(name, module, ids):
    if name == "llama":  # HF: the original's loss_function through labels
        return module(input_ids=ids, labels=ids).loss
    logits = module(ids)  # nanoGPT returns logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _optimizer(kind, params):
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, eps=1e-6, weight_decay=0.01)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _is_sharded(module):
    from torch.distributed.tensor import DTensor

    return all(isinstance(p, DTensor) for p in module.parameters())


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _train(compiled, name, opt_kind, mode, rank):
    """Losses per step (the global-batch mean) and final weights by name, for one way of running."""
    ids = _batch()
    sharded = []
    if mode == "single":
        model, mine = compiled, ids
    else:
        mine = ids.chunk(WORLD)[rank]
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(compiled)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (WORLD,))  # the default mesh is CUDA's wherever a GPU is visible
            if mode == "fsdp_layers":
                layers = list(compiled.get_submodule("model.layers" if name == "llama" else "h").children())
                for layer in layers:
                    fully_shard(layer, mesh=mesh)
                # when layer i runs, layer i-1 has given its gathered parameters back (FSDP per layer, not per model)
                for before, layer in zip(layers, layers[1:]):
                    layer.register_forward_pre_hook(
                        lambda mod, args, before=before: sharded.append(_is_sharded(before)))
            model = fully_shard(compiled, mesh=mesh)
    opt = _optimizer(opt_kind, model.parameters())
    losses = []
    for _ in range(STEPS):
        loss = _loss(name, model, mine)
        loss.backward()
        opt.step()
        opt.zero_grad()
        global_loss = loss.detach().clone()
        if mode != "single":
            dist.all_reduce(global_loss)
            global_loss /= WORLD
        losses.append(global_loss.item())
    if mode.startswith("fsdp"):
        assert _is_sharded(compiled)
    if mode == "fsdp_layers":  # the split made each sharded layer a module call in the graph
        calls = [n for n in compiled._graph_module.graph.nodes if n.op == "call_module" and n.target != "_guards_fn"]
        assert len(calls) == 4, [n.target for n in calls]
        assert len(sharded) == 3 * STEPS and all(sharded), sharded
    weights = {n: _full(p) for n, p in compiled.named_parameters()}
    return losses, weights


def _worker(rank, store_dir, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        results = {}
        for name, (opt_kind, modes) in CASES.items():
            # compiling is the slow part: the reference and DDP share one compiled model (reset in between); FSDP
            # changes the module it shards, so each FSDP run compiles afresh
            compiled = _compiled(name)
            init = {k: v.clone() for k, v in compiled.state_dict().items()}
            results[name, "single"] = _train(compiled, name, opt_kind, "single", rank)  # the whole batch, no dist
            compiled.load_state_dict(init)
            for mode in modes:
                model = compiled if mode == "ddp" else _compiled(name)
                results[name, mode] = _train(model, name, opt_kind, mode, rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp2_match_single_process(tmp_path):
    import torch.multiprocessing as mp

    (tmp_path / "store").mkdir()
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for name, (_, modes) in CASES.items():
        ref_losses, ref_weights = ranks[0][name, "single"]
        assert ref_losses[-1] < ref_losses[0], f"{name}: single-process training did not lower the loss {ref_losses}"
        assert any("hysparse" in n for n in ref_weights), "the new gate / sink parameters are trained too"
        for mode in ("single", *modes):
            for rank in range(WORLD):
                losses, weights = ranks[rank][name, mode]
                torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"{name} {mode} rank {rank} losses: {m}")
                assert weights.keys() == ref_weights.keys()
                for key, ref in ref_weights.items():
                    torch.testing.assert_close(weights[key], ref, rtol=1e-5, atol=1e-5,
                                               msg=lambda m: f"{name} {mode} rank {rank} {key}: {m}")


@pytest.mark.parametrize("name", ["gpt2-eager", "softmax"])
def test_sharded_regions_compute_what_the_flat_graph_computes(name, gen):
    """The graph surgery alone, in one process: cutting every layer and, inside it, its MLP out of the flat graph as
    module calls (what per-module fully_shard triggers) changes no output and no gradient. GPT-2 (padding roll,
    Conv1D, fused qkv) and the explicit-softmax model with GQA cover other layouts than the distributed test."""
    import hysparse_compile as hs
    from hysparse_compile import fsdp

    compiled = hs.compile(models.build(name, layers=4), hs.Schedule.from_pattern(
        "FSSS", block_size=16, topk=32, window=16), gate_init=0.01, sink_init=0.1)
    ids = torch.randint(0, models.VOCAB, (2, SEQ), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding (GPT-2 takes a mask)
    kwargs = {"attention_mask": mask} if name.startswith("gpt2") else {}

    def run():
        compiled.zero_grad()
        out = models.logits(compiled(ids, **kwargs))
        (out.float() ** 2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in compiled.named_parameters() if p.grad is not None}

    ref_out, ref_grads = run()
    layers = "transformer.h" if name.startswith("gpt2") else "h"
    gm = compiled._graph_module
    paths = [f"{layers}.{i}" for i in range(4)]
    for path in [p + ".mlp" for p in paths] + paths:  # innermost first, as split_sharded_regions does
        assert fsdp.extract_region(gm, path) is not None, path
    gm.graph.lint()
    gm.recompile()
    assert [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target != "_guards_fn"] == paths
    out, grads = run()
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    assert grads.keys() == ref_grads.keys()
    for key in grads:
        torch.testing.assert_close(grads[key], ref_grads[key], rtol=0, atol=0, msg=lambda m: f"{key}: {m}")
