"""The Triton kernels' variant flags the benches share (`check_gpu`, `bench_e2e`): they set the kernel modules'
defaults, so that every op call (the backward's recomputation included) runs the variant. Also `--inductor`
(`bench_e2e`, `memory_peak`): Inductor's own options, for both models of a run."""
from __future__ import annotations


def add_token_tma_argument(parser) -> None:
    parser.add_argument("--token-tma", default=None, choices=("off", "4d", "2d"),
                        help="the token-major sparse forward's K/V loads: pointers (off) or tensor descriptors (4-D, "
                             "the default TOKEN_TMA, or 2-D)")


def apply(full_fwd: str | None = None, combine: str | None = None, token_tma: str | None = None) -> None:
    """--full-fwd VARIANT (bench/full_fwd_variants.py) into FWD_CONFIG, --combine into BLOCK_COMBINE, --token-tma
    into TOKEN_TMA at every size (TOKEN_TMA_TIMED = None: asked for, not only where it was timed). ValueError naming
    the valid variants for an unknown one, before anything is set."""
    from hysparse_compile.kernels.triton import full_attention as fa
    from hysparse_compile.kernels.triton import sparse_attention as tsa

    from .full_fwd_variants import VARIANTS
    if full_fwd is not None and full_fwd not in VARIANTS:
        raise ValueError(f"--full-fwd {full_fwd!r}: choose from {', '.join(VARIANTS)}")
    if full_fwd is not None:
        fa.FWD_CONFIG.update(VARIANTS[full_fwd])
    if combine:
        tsa.BLOCK_COMBINE = combine
    if token_tma:
        tsa.TOKEN_TMA = False if token_tma == "off" else token_tma
        tsa.TOKEN_TMA_TIMED = None


def add_inductor_argument(parser) -> None:
    parser.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                        help="set torch._inductor.config.KEY (a Python literal) before compiling; repeatable")


def inductor_config(pairs: list[str]) -> None:
    """`--inductor KEY=VALUE`: torch._inductor.config.KEY = VALUE (a Python literal), printed with the run; SystemExit
    naming an unknown KEY."""
    import ast

    import torch._inductor.config as cfg

    for pair in pairs:
        key, _, value = pair.partition("=")
        if not hasattr(cfg, key):
            raise SystemExit(f"--inductor {pair!r}: torch._inductor.config has no {key!r}")
        setattr(cfg, key, ast.literal_eval(value))
        print(f"torch._inductor.config.{key} = {getattr(cfg, key)!r}")
