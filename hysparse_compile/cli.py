"""The ``hysparse-compile`` command line: schedules, KV plans, inspection and the demo.

    hysparse-compile schedule presets
    hysparse-compile schedule show hysparse-80b-a3b
    hysparse-compile schedule validate my_schedule.yaml
    hysparse-compile plan hysparse-80b-a3b --kv-heads 4 --head-dim 128 --seq-len 128k --budget 80GiB
    hysparse-compile inspect --model llama-tiny --pattern "FSSS FSSF" --html out.html
    hysparse-compile generate --model llama-tiny --pattern FSSS --prompt-len 200 --new 50
    hysparse-compile demo

User errors (a bad file, an unknown preset, a schedule that fails validation) exit with code 2 and a one-line
message, never a traceback.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from hysparse_compile.kv_plan import parse_bytes, plan_kv
from hysparse_compile.schedule import Schedule

app = typer.Typer(help="Compile PyTorch transformers into HySparse models: schedules, KV plans, inspection, demo.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
schedule_app = typer.Typer(help="List, show and validate layer schedules.", no_args_is_help=True)
app.add_typer(schedule_app, name="schedule")

USER_ERRORS = (ValueError, TypeError, KeyError, OSError)


def _console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 120, highlight=False)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _load_schedule(source: str, *, allow_preset: bool = True) -> Schedule:
    """A schedule from a file path (.yaml/.yml/.toml/.json) or, if ``allow_preset``, a preset name."""
    path = Path(source)
    presets = Schedule.presets()
    try:
        if path.is_file():
            return Schedule.load(path)
        if allow_preset and source in presets:
            return Schedule.preset(source)
    except USER_ERRORS as exc:
        _fail(str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc))
    if path.suffix or "/" in source or not allow_preset:
        _fail(f"no such schedule file: {source}")
    _fail(f"unknown preset {source!r}; valid presets: {', '.join(presets)} (or give a .yaml/.toml/.json file)")


def _summary(schedule: Schedule) -> str:
    return (f"{len(schedule)} layers ({schedule.num_full} full, {schedule.num_sparse} sparse), "
            f"block_size {schedule.block_size}, topk {schedule.topk}, window {schedule.window}, "
            f"kv_sharing {schedule.kv_sharing}, swa {schedule.swa}, mode {schedule.mode}")


def _kv_source(spec) -> str:
    if spec.role == "full":
        return "own"
    if spec.merge or spec.kv_sharing == "none":
        return f"own (indices from {spec.kv_source})"
    branches = "both branches" if spec.kv_sharing == "both" else "sparse branch"
    return f"layer {spec.kv_source} ({branches})"


@schedule_app.command("presets")
def schedule_presets() -> None:
    """List the named schedule presets (the paper's configurations)."""
    table = Table(title="schedule presets")
    table.add_column("name")
    table.add_column("description")
    for name, description in Schedule.presets().items():
        table.add_row(name, description)
    _console().print(table)


@schedule_app.command("show")
def schedule_show(source: str = typer.Argument(..., help="preset name or schedule file")) -> None:
    """Show every layer's role, KV source, window, topk, gate and sinks."""
    schedule = _load_schedule(source)
    table = Table(title=f"schedule {source}")
    for column in ("layer", "role", "KV source", "window", "topk", "gate", "sinks"):
        table.add_column(column, justify="right" if column in ("layer", "window", "topk") else "left")
    for spec in schedule.layers:
        sparse = spec.role == "sparse"
        table.add_row(str(spec.index), spec.role, _kv_source(spec),
                      ("merged " if spec.merge else "") + str(spec.window) if sparse and spec.window else "-",
                      str(spec.topk), spec.gate if sparse else "-", str(spec.sinks) if sparse else "-")
    console = _console()
    console.print(table)
    console.print(_summary(schedule))


@schedule_app.command("validate")
def schedule_validate(path: str = typer.Argument(..., help="schedule file (.yaml/.yml/.toml/.json)")) -> None:
    """Check a schedule file; exit 0 if valid, 2 with the reason if not."""
    schedule = _load_schedule(path, allow_preset=False)
    typer.echo(f"ok: {len(schedule)} layers ({schedule.num_full} full, {schedule.num_sparse} sparse)")


def _parse_tokens(name: str, value: str) -> int:
    """'32768', '32k' (x1024) or '1M' (x1024**2) -> int."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", value)
    if not match or int(match.group(1)) <= 0:
        _fail(f"{name} must be a positive token count like 32768 or 32k, got {value!r}")
    return int(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[match.group(2).lower()]


@app.command("plan")
def plan(source: str = typer.Argument(..., help="preset name or schedule file"),
         kv_heads: int = typer.Option(8, "--kv-heads", help="KV heads per layer (Hkv)"),
         head_dim: int = typer.Option(128, "--head-dim", help="head dimension d"),
         batch: int = typer.Option(1, "--batch", help="sequences"),
         seq_len: str = typer.Option("32768", "--seq-len", help="context tokens (32768 or 32k)"),
         dtype: str = typer.Option("bfloat16", "--dtype", help="KV cache dtype"),
         budget: Optional[str] = typer.Option(None, "--budget", help="memory for KV cache, e.g. 80GiB or 80GB"),
         ) -> None:
    """KV cache per layer and in total against full attention; with --budget, the largest batch and context."""
    schedule = _load_schedule(source)
    tokens = _parse_tokens("--seq-len", seq_len)
    try:
        kv = plan_kv(schedule, num_kv_heads=kv_heads, head_dim=head_dim, batch=batch, seq_len=tokens, dtype=dtype)
        budget_bytes = parse_bytes(budget) if budget is not None else None
    except USER_ERRORS as exc:
        _fail(str(exc))
    console = _console()
    console.print(kv.table(title=f"KV cache plan for {source}: batch {batch}, context {tokens}, {kv.dtype}, "
                                 f"{kv_heads} KV heads x d={head_dim}"))
    console.print(kv.summary())
    if budget_bytes is None:
        return
    table = Table(title=f"what fits in {budget} ({budget_bytes} B) of KV cache")
    for column in ("", "HySparse", "full attention"):
        table.add_column(column, justify="right" if column else "left")
    table.add_row(f"max batch at context {tokens}",
                  str(kv.max_batch(budget_bytes, tokens)), str(kv.max_batch(budget_bytes, tokens, baseline=True)))
    table.add_row(f"max context at batch {batch}",
                  str(kv.max_seq_len(budget_bytes, batch)), str(kv.max_seq_len(budget_bytes, batch, baseline=True)))
    console.print(table)


def _tiled_schedule(pattern: Optional[str], ratio: int, num_layers: int, options: dict) -> Schedule:
    """A schedule for a built-in model: --pattern (repeated when it is shorter and divides the layer count, e.g.
    FSSS on 8 layers is FSSSFSSS) or hybrid(num_layers, ratio)."""
    try:
        if pattern is None:
            return Schedule.hybrid(num_layers, ratio, **options)
        letters = pattern.replace(" ", "")
        if letters and len(letters) < num_layers and num_layers % len(letters) == 0:
            letters *= num_layers // len(letters)
        schedule = Schedule.from_pattern(letters, **options)
    except USER_ERRORS as exc:
        _fail(str(exc))
    if len(schedule) != num_layers:
        _fail(f"--pattern has {len(pattern.replace(' ', ''))} layers but the model has {num_layers} attention layers "
              f"(give {num_layers} letters, or a pattern whose length divides {num_layers})")
    return schedule


@app.command("inspect")
def inspect_cmd(model: str = typer.Option("llama-tiny", "--model", help="llama-tiny, gpt2-tiny or nanogpt"),
                pattern: Optional[str] = typer.Option(None, "--pattern", help="F/S per layer (repeated to the layer "
                                                             "count if shorter); default hybrid 1:3"),
                ratio: int = typer.Option(3, "--ratio", help="full:sparse ratio when no --pattern is given"),
                block_size: int = typer.Option(16, "--block-size"),
                topk: int = typer.Option(64, "--topk"),
                window: int = typer.Option(32, "--window"),
                mode: str = typer.Option("paper", "--mode", help="paper or training_free"),
                html: Optional[Path] = typer.Option(None, "--html", help="write the HTML report here"),
                dot: Optional[Path] = typer.Option(None, "--dot", help="write the DOT diagram here"),
                ) -> None:
    """Compile a small built-in model and print what the compiler did (roles, edges, KV plan)."""
    from hysparse_compile import demo

    if model not in demo.MODELS:
        _fail(f"unknown model {model!r}; valid models: {', '.join(demo.MODELS)}")
    net = demo.build_model(model)
    schedule = _tiled_schedule(pattern, ratio, demo.num_attention_layers(net),
                               dict(block_size=block_size, topk=topk, window=window, mode=mode))
    try:
        report = demo.compile_and_inspect(net, schedule)
    except USER_ERRORS as exc:  # the compiler's own errors name what was wrong (unsupported model, shapes)
        _fail(str(exc))
    _console().print(str(report), markup=False, soft_wrap=True)
    if dot is not None:
        dot.write_text(report.to_dot())
        typer.echo(f"wrote {dot}")
    if html is not None:
        html.write_text(report.to_html())
        typer.echo(f"wrote {html}")


@app.command("generate")
def generate_cmd(model: str = typer.Option("llama-tiny", "--model", help="llama-tiny, gpt2-tiny or nanogpt"),
                 pattern: Optional[str] = typer.Option(None, "--pattern",
                                                       help="F/S per layer (repeated to the layer count if shorter); "
                                                            "default hybrid 1:3"),
                 ratio: int = typer.Option(3, "--ratio", help="full:sparse ratio when no --pattern is given"),
                 prompt_len: int = typer.Option(200, "--prompt-len", help="tokens in the (random) prompt"),
                 new: int = typer.Option(50, "--new", help="tokens to generate"),
                 block_size: int = typer.Option(16, "--block-size"),
                 topk: int = typer.Option(64, "--topk"),
                 window: int = typer.Option(32, "--window"),
                 mode: str = typer.Option("paper", "--mode", help="paper or training_free"),
                 ) -> None:
    """Generate with a built-in model: tokens/s and KV-cache bytes of the compiled model against the original,
    and cached decoding checked against re-running the whole sequence (exit code 1 if it differs)."""
    from hysparse_compile import demo

    if model not in demo.MODELS:
        _fail(f"unknown model {model!r}; valid models: {', '.join(demo.MODELS)}")
    for name, value in (("--prompt-len", prompt_len), ("--new", new)):
        if value < 1:
            _fail(f"{name} must be a positive number of tokens, got {value}")
    net = demo.build_model(model)
    limit = demo.max_positions(net)
    if prompt_len + new > limit:
        _fail(f"--prompt-len {prompt_len} + --new {new} = {prompt_len + new} tokens, but {model} has {limit} "
              f"positions")
    schedule = _tiled_schedule(pattern, ratio, demo.num_attention_layers(net),
                               dict(block_size=block_size, topk=topk, window=window, mode=mode))
    import hysparse_compile as hs

    console = _console()
    console.print(f"{model}: schedule {schedule.pattern}, block_size {block_size}, topk {topk}, window {window}, "
                  f"mode {mode}")
    try:
        compiled = hs.compile(net, schedule)
    except USER_ERRORS as exc:
        _fail(str(exc))
    if not demo.generation_report(net, compiled, prompt_len, new, console):
        raise typer.Exit(1)


EXPORT_FORMATS = ("onnx", "onnx-custom", "aoti")


def _export_ops(result) -> str:
    """'1,234 nodes, 41 op types; hysparse::FullAttention x2, ...' (or 'standard ONNX only')."""
    ops = result.ops
    custom = [f"{name} x{n}" for name, n in ops.items() if "::" in name and name.startswith("hysparse")]
    head = f"{sum(ops.values()):,} nodes, {len(ops)} op types"
    if result.format == "onnx":
        return f"{head}; standard ONNX only (TopK x{ops.get('TopK', 0)})"
    return f"{head}; " + (", ".join(custom) if custom else "HySparse ops decomposed to ATen")


@app.command("export")
def export_cmd(out: Path = typer.Argument(..., help="file to write: .onnx (onnx, onnx-custom) or .pt2 (aoti)"),
               model: str = typer.Option("llama-tiny", "--model", help="llama-tiny, gpt2-tiny or nanogpt"),
               pattern: Optional[str] = typer.Option(None, "--pattern",
                                                     help="F/S per layer (repeated to the layer count if shorter); "
                                                          "default hybrid 1:3"),
               ratio: int = typer.Option(3, "--ratio", help="full:sparse ratio when no --pattern is given"),
               fmt: str = typer.Option("onnx", "--format", help="onnx (standard ops), onnx-custom (hysparse "
                                                                 "domain nodes) or aoti (AOTInductor package)"),
               decode: bool = typer.Option(False, "--decode", help="also export the decode-step graph (onnx, aoti)"),
               seq_len: int = typer.Option(64, "--seq-len", help="tokens of the example the graph is captured "
                                                                  "with (the file serves any length)"),
               batch: int = typer.Option(1, "--batch", help="rows of the example (the file serves any batch)"),
               opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset (>= 18; default: torch's)"),
               block_size: int = typer.Option(16, "--block-size"),
               topk: int = typer.Option(64, "--topk"),
               window: int = typer.Option(32, "--window"),
               mode: str = typer.Option("paper", "--mode", help="paper or training_free"),
               ) -> None:
    """Compile a built-in model and export it (ONNX with standard or custom-domain ops, or an AOTInductor
    package), check the file against the compiled model, and print a summary."""
    import time

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from hysparse_compile import demo

    if fmt not in EXPORT_FORMATS:
        _fail(f"unknown --format {fmt!r}; valid formats: {', '.join(EXPORT_FORMATS)}")
    if model not in demo.MODELS:
        _fail(f"unknown model {model!r}; valid models: {', '.join(demo.MODELS)}")
    if seq_len < 1:
        _fail(f"--seq-len must be at least 1 token, got {seq_len}")
    if batch < 1:
        _fail(f"--batch must be at least 1, got {batch}")
    console = _console()
    done: list[tuple[str, float]] = []
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        task = progress.add_task(f"build {model}")
        clock = [time.perf_counter()]

        def stage(text: str) -> None:
            now = time.perf_counter()
            description = progress.tasks[0].description
            done.append((description, now - clock[0]))
            progress.console.print(f"[green]✓[/green] {description} ({now - clock[0]:.1f} s)")
            clock[0] = now
            progress.update(task, description=text)

        net = demo.build_model(model)
        schedule = _tiled_schedule(pattern, ratio, demo.num_attention_layers(net),
                                   dict(block_size=block_size, topk=topk, window=window, mode=mode))
        import torch

        import hysparse_compile as hs
        from hysparse_compile import export

        vocab = getattr(getattr(net, "config", None), "vocab_size", demo.VOCAB)
        ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
        try:
            stage(f"compile ({schedule.pattern})")
            compiled = hs.compile(net, schedule)
            if fmt == "aoti":
                result = export.to_aoti(compiled, ids, out, decode=decode, stage=stage)
            else:
                result = export.to_onnx(compiled, ids, out, ops="custom" if fmt == "onnx-custom" else "standard",
                                        decode=decode, opset=opset, stage=stage)
        except (*USER_ERRORS, NotImplementedError) as exc:
            _fail(str(exc))
        stage("done")
    table = Table(title=f"exported {model} ({schedule.pattern}) as {fmt}")
    for column in ("file", "size", "ops", "check"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for i, f in enumerate(result.files):
        size = f.stat().st_size
        table.add_row(str(f), f"{size / 2**20:.2f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB",
                      _export_ops(result) if i == 0 else "", result.check if i == 0 else "")
    console.print(table)
    console.print(f"wrote {', '.join(map(str, result.files))} ({result.size:,} bytes)", soft_wrap=True)


@app.command("demo")
def demo_cmd() -> None:
    """Compile a small Llama, show the plan, train a few steps, and check training-free exactness."""
    from hysparse_compile import demo

    code = demo.main()
    if code:
        raise typer.Exit(code)


def main() -> None:  # pragma: no cover - `python -m hysparse_compile.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
