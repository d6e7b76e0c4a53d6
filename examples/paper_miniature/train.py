"""Train one variant of the miniature, then evaluate it (evaluation.py) and save it.

    python examples/paper_miniature/train.py --variant hysparse-1:3 --seed 0 --steps 600 --context 4096 --batch 4 \
        --out runs/                                                      # GPU: bf16 autocast, Triton kernels
    python examples/paper_miniature/train.py --variant hysparse-1:3 --smoke --data /tmp/pm_data --out /tmp/pm_runs

Writes `<out>/<variant>_s<seed>/` (`..._<tag>/` with --tag): `model.pt` (state_dict: the plain module's weights, plus the gates and sinks of a
compiled one), `config.json` (model config, variant, sparse settings, schedule, training arguments) and
`metrics.json` (loss curves, per-step GPU time, tokens, and the final evaluation).

AdamW (beta 0.9 / 0.95, weight decay 0.1 on matrices, gradient clip 1.0), linear warmup then WSD (the paper's: flat,
then a linear decay over the last 20%) or cosine. Every variant of one seed starts from the same initial weights and
sees the same batches (the needle sequences included), so the token budget and data are equal by construction.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import hysparse_compile as hs

import common
import variants
from common import console
from corpus import Corpus
from evaluation import EvalSettings, evaluate_model, logits_of, loss_by_position
from model import GPTConfig

SMOKE = dict(context=128, layers=4, width=64, heads=4, kv_heads=1, batch=4, steps=3, eval_every=2, eval_seqs=4,
             probe_samples=2, decode_new=4, log_every=1)
DEFAULTS = dict(context=4096, layers=8, width=256, heads=4, kv_heads=1, batch=4, steps=600, eval_every=100,
                eval_seqs=16, probe_samples=16, decode_new=64, log_every=10)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", required=True, choices=variants.NAMES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--context", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--out", type=Path, default=Path("runs"))
    ap.add_argument("--data", type=Path, default=common.HERE / "data")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--block-size", type=int, help="default: 64 at context >= 2048, else 16")
    ap.add_argument("--topk", type=int, help="tokens each full layer selects; default context / 8")
    ap.add_argument("--window", type=int, help="SWA window; default 128 at context >= 2048")
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--lr-schedule", choices=("wsd", "cosine"), default="wsd")
    ap.add_argument("--warmup-frac", type=float, default=0.05)
    ap.add_argument("--decay-frac", type=float, default=0.2, help="WSD: share of steps in the final decay")
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--needle-rate", type=float, default=0.05, help="share of training sequences with a needle")
    ap.add_argument("--needle-pairs", type=int, help="most key-value pairs in a needle sequence (default context/256)")
    ap.add_argument("--tag", help="a group name for runs outside the main plan (e.g. a retrieval-heavy mix): the run "
                    "folder is <variant>_s<seed>_<tag> and the tables list the group apart")
    ap.add_argument("--eval-every", type=int)
    ap.add_argument("--eval-seqs", type=int)
    ap.add_argument("--probe-samples", type=int)
    ap.add_argument("--decode-new", type=int, help="tokens timed in the decode-speed measurement (0: skip)")
    ap.add_argument("--no-final-eval", action="store_true")
    ap.add_argument("--log-every", type=int)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backend", default="auto", choices=("auto", "reference", "flex", "triton"))
    ap.add_argument("--torch-compile", action="store_true", help="torch.compile the model (slower start)")
    ap.add_argument("--repeat-batch", action="store_true", help="train on one fixed batch (tests: loss must fall)")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on CPU in seconds (and no hs.generate twin of "
                    "`full`: one compile less)")
    args = ap.parse_args(argv)
    for key, value in (SMOKE if args.smoke else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def param_groups(model: torch.nn.Module, weight_decay: float):
    """Weight decay on matrices (projections, embeddings, gate weights), none on norms, biases and sinks."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class StepTimer:
    """Per-step time: CUDA events on the GPU (read at log points, so no sync per step), wall clock on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.pending, self.ms = [], []

    def start(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def stop(self, begin):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.pending.append((begin, e))
        else:
            self.ms.append(1e3 * (time.perf_counter() - begin))

    def collect(self) -> list[float]:
        if self.pending:
            self.pending[-1][1].synchronize()
            self.ms += [b.elapsed_time(e) for b, e in self.pending]
            self.pending = []
        return self.ms


def main(argv=None) -> int:
    args = parse(argv)
    device = common.pick_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    t_start = time.perf_counter()
    corpus = Corpus(args.data)
    base = GPTConfig(context=args.context, n_layer=args.layers, n_embd=args.width, n_head=args.heads,
                     n_kv_head=args.kv_heads)
    sparse = variants.sparse_settings(args.context, block_size=args.block_size, topk=args.topk, window=args.window)
    torch.manual_seed(args.seed)  # same initial weights for every variant of a seed (new HySparse weights are zeros)
    built = variants.build(args.variant, base, sparse, device=device, backend=args.backend)
    compile_s = time.perf_counter() - t_start
    # every variant compiled alike, with the Inductor options the library gives for this torch (docs/compiler.md)
    model = torch.compile(built.model, options=hs.inductor_options()) if args.torch_compile else built.model
    n_params = sum(p.numel() for p in built.model.parameters())
    n_new = sum(p.numel() for n, p in built.model.named_parameters() if "hysparse" in n)
    pattern = variants.pattern_for(args.variant, args.layers)
    console.print(f"[bold]{args.variant}[/] seed {args.seed} on {device}: {pattern}, {n_params / 1e6:.2f}M params "
                  f"({n_new} new), {sparse}, context {args.context} x batch {args.batch}, {args.steps} steps "
                  f"= {args.steps * args.batch * args.context / 1e6:.1f}M tokens; built in {compile_s:.1f} s")

    opt = torch.optim.AdamW(param_groups(built.model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                            fused=device.type == "cuda")
    rng = np.random.default_rng(args.seed)  # data order: the same for every variant of a seed
    needles = dict(needle_rate=args.needle_rate, needle_pairs=args.needle_pairs)
    fixed = corpus.batch("train", rng, batch=args.batch, length=args.context + 1, **needles)
    val_windows = corpus.fixed_windows("val", count=args.eval_seqs, length=args.context + 1)
    warmup = max(1, int(args.warmup_frac * args.steps))
    curve = {"step": [], "train_loss": [], "lr": []}
    val_curve = {"step": [], "tokens": [], "val_loss": []}
    timer, pending_loss = StepTimer(device), []
    tokens_per_step = args.batch * args.context

    def periodic_eval(step):
        built.model.eval()
        v = float(loss_by_position(model, val_windows, device=device, batch=args.batch).mean())
        built.model.train()
        val_curve["step"].append(step)
        val_curve["tokens"].append(step * tokens_per_step)
        val_curve["val_loss"].append(v)
        return v

    built.model.train()
    val_loss = periodic_eval(0)
    t_train = time.perf_counter()
    with common.progress(args.variant) as bar:
        task = bar.add_task(args.variant, total=args.steps, info=f"val {val_loss:.3f}")
        for step in range(args.steps):
            lr = common.lr_at(step, args.steps, peak=args.lr, warmup=warmup, schedule=args.lr_schedule,
                              min_frac=args.min_lr_frac, decay_frac=args.decay_frac)
            for group in opt.param_groups:
                group["lr"] = lr
            rows = fixed if args.repeat_batch else corpus.batch(
                "train", rng, batch=args.batch, length=args.context + 1, **needles)
            x = torch.from_numpy(rows.astype(np.int64)).to(device, non_blocking=True)
            begin = timer.start()
            with common.autocast(device):
                logits = logits_of(model(x[:, :-1]))
            loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(built.model.parameters(), args.clip)
            opt.step()
            timer.stop(begin)
            pending_loss.append(loss.detach())
            last = step + 1 == args.steps
            if (step + 1) % args.log_every == 0 or last:
                losses = torch.stack(pending_loss).float().cpu().tolist()
                pending_loss = []
                for i, value in enumerate(losses):
                    curve["step"].append(step + 1 - len(losses) + i + 1)
                    curve["train_loss"].append(value)
                    curve["lr"].append(lr)
                if not math.isfinite(losses[-1]):
                    console.print(f"[red]loss is {losses[-1]} at step {step + 1}: stopping")
                    return 2
                ms = timer.collect()
                recent = float(np.median(ms[-args.log_every:]))
                info = f"loss {losses[-1]:.3f} val {val_loss:.3f} | {recent:.1f} ms/step " \
                       f"{tokens_per_step / recent * 1e3:,.0f} tok/s"
                bar.update(task, info=info)
            if (step + 1) % args.eval_every == 0 or last:
                val_loss = periodic_eval(step + 1)
                recent = float(np.median(timer.collect()[-args.eval_every:]))
                train_loss = curve["train_loss"][-1] if curve["train_loss"] else float("nan")
                bar.console.print(f"step {step + 1}/{args.steps}: train {train_loss:.4f} val "
                                  f"{val_loss:.4f} | {recent:.1f} ms/step, {tokens_per_step / recent * 1e3:,.0f} "
                                  f"tok/s | lr {lr:.2e} | {time.perf_counter() - t_train:.0f} s")
            bar.advance(task)
    common.sync(device)
    train_s = time.perf_counter() - t_train
    step_ms = timer.collect()
    steady = step_ms[min(len(step_ms) - 1, max(1, len(step_ms) // 10)):]  # drop the warm-up steps (kernel JIT)
    ms_step = float(np.median(steady))
    console.print(f"{args.variant}: {args.steps} steps in {train_s:.1f} s; median {ms_step:.1f} ms/step "
                  f"({'GPU' if device.type == 'cuda' else 'CPU'} time) = {tokens_per_step / ms_step * 1e3:,.0f} tok/s; "
                  f"final val loss {val_loss:.4f}")

    run = args.out / common.run_name(args.variant, args.seed, args.tag)
    run.mkdir(parents=True, exist_ok=True)
    torch.save(built.model.state_dict(), run / "model.pt")
    config = variants.run_config(args.variant, base, sparse, built)
    config["train"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    common.write_json(run / "config.json", config)
    settings = EvalSettings.for_context(args.context, eval_seqs=args.eval_seqs, probe_samples=args.probe_samples,
                                        batch=args.batch, decode_new=args.decode_new)
    metrics = {
        "variant": args.variant, "seed": args.seed, "group": args.tag, "needle_rate": args.needle_rate,
        "needle_pairs": args.needle_pairs or max(1, (args.context + 1) // 256), "steps": args.steps,
        "tokens_per_step": tokens_per_step,
        "tokens": tokens_per_step * args.steps, "params": n_params, "new_params": n_new, "pattern": pattern,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "build_s": compile_s, "train_s": train_s, "ms_per_step": ms_step,
        "ms_per_step_all": step_ms, "tok_per_s": tokens_per_step / ms_step * 1e3,
        "curve": curve, "val_curve": val_curve, "final_val_loss": val_loss,
    }
    if not args.no_final_eval:
        t = time.perf_counter()
        twin = variants.all_full(built.plain, sparse, device=device, backend=args.backend) \
            if variants.VARIANTS[args.variant].kind == "full" and not args.smoke else None
        metrics["eval"] = evaluate_model(built, corpus, settings, device=device, runtime_twin=twin)
        metrics["eval_settings"] = settings.to_dict()
        metrics["eval_s"] = time.perf_counter() - t
        e = metrics["eval"]
        r = e["retrieval"]["single"]
        console.print(f"eval: loss by bucket {[round(v, 3) for v in e['loss_by_bucket']]}, retrieval "
                      f"{[round(v, 2) for v in r['acc']]}, needle gain (nats/byte) "
                      f"{[round(c - v, 2) for v, c in zip(r['loss'], r['control_loss'])]}, "
                      f"KV {e['kv_bytes'] / 2**20:.2f} MiB ({metrics['eval_s']:.1f} s)")
    common.write_json(run / "metrics.json", metrics)
    console.print(f"wrote {run} (total {time.perf_counter() - t_start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
