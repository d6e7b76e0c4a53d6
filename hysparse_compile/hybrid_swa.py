"""Hybrid-SWA originals: a model's own layer types, and the schedule that keeps them (`Schedule.from_model`).

Models such as Gemma 2/3, gpt-oss, Cohere 2 alternate global layers with sliding-window layers; Mistral (with
`sliding_window`) slides on every layer. `Schedule.from_model(model, **options)` maps them onto HySparse:

    original layer                                   schedule letter   what the compiled layer does
    global (full causal attention)                   F                 full attention + block selection
    sliding, after a global layer                    S                 sparse layer: SWA branch = original window
                                                                       (+ the selected blocks when topk > 0)
    sliding, before the first global layer           W                 window-only: the original sliding window
    every layer sliding: layer 0                     F (warned)        full attention over the whole prefix

`sliding="window"` keeps every sliding layer W: the original itself, as a schedule (its KV plan is the original's).
`mode="training_free", topk=0` reproduces the original: F layers are its global layers, S layers one softmax over
their own window (the training-free merge with nothing selected), W layers their window. docs/compiler.md,
"Hybrid-SWA models: Schedule.from_model", says what is exact.

    >>> Schedule.from_model(gemma3).pattern            # layer_types sliding x5, full, sliding x5, full, ...
    'WWWWWFSSSSSF...'
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any

log = logging.getLogger(__name__)

GLOBAL_TYPES = ("full_attention",)
SLIDING_TYPES = ("sliding_attention",)


def _text_config(model):
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        try:
            return config.get_text_config()
        except Exception:  # pragma: no cover - exotic configs
            return config
    return config


def config_layer_windows(model, num_layers: int | None = None) -> list[int | None] | None:
    """The sliding window of each attention layer as the HF config declares it (None = a global layer), or None
    when the model has no config or its config says nothing about sliding windows.

    Read, in order: `config.layer_types` ("sliding_attention" / "full_attention", with `config.sliding_window`),
    `config.sliding_window_pattern` (every p-th layer global, older Gemma 3 configs), then `config.sliding_window`
    with `use_sliding_window` not False (every layer sliding: Mistral). Another layer type (chunked, linear or
    recurrent attention) raises: it is neither global nor a sliding window.
    """
    config = _text_config(model)
    if config is None:
        return None
    window = getattr(config, "sliding_window", None)
    window = window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None
    n = num_layers if num_layers is not None else getattr(config, "num_hidden_layers", None)
    types = getattr(config, "layer_types", None)
    if types:
        unknown = sorted({t for t in types if t not in GLOBAL_TYPES + SLIDING_TYPES})
        if unknown:
            raise ValueError(f"{type(config).__name__}.layer_types has {', '.join(map(repr, unknown))} layers: "
                             f"HySparse takes global ('full_attention') and sliding-window ('sliding_attention') "
                             f"attention layers only")
        if any(t in SLIDING_TYPES for t in types) and window is None:
            raise ValueError(f"{type(config).__name__}.layer_types has sliding layers but config.sliding_window is "
                             f"{getattr(config, 'sliding_window', None)!r}")
        return [window if t in SLIDING_TYPES else None for t in types]
    pattern = getattr(config, "sliding_window_pattern", None)
    if isinstance(pattern, int) and pattern > 0 and window is not None and n:
        return [window if (i + 1) % pattern else None for i in range(n)]
    if window is not None and getattr(config, "use_sliding_window", True) is not False and n:
        return [window] * n
    return None


def measured_layer_windows(model, example_inputs=None) -> list[int | None]:
    """The sliding window of each attention site as the probe measures it on the captured graph (one export, as
    `compile` does): a causal mask restricted to the last `w` keys gives `w`, a causal mask None."""
    from .passes import CompileState, capture, find_attention, probe
    from .schedule import Schedule

    state = capture.run(CompileState(model=model, schedule=Schedule.from_pattern("F"),
                                     example_inputs=example_inputs))
    sites = find_attention.find_sites(state.gm)
    probe.check_sites(state, sites)
    return [site.window for site in sites]


def layer_windows(model, example_inputs=None) -> tuple[list[int | None], str]:
    """(window per attention layer, where it was read): the HF config, else the masks measured on the graph."""
    windows = config_layer_windows(model)
    if windows is not None:
        return windows, "config"
    return measured_layer_windows(model, example_inputs), "probe"


def schedule_from_model(cls, model, *, example_inputs=None, sliding: str = "sparse", options: dict[str, Any]):
    """`Schedule.from_model`: see the module docstring. `sliding="window"` keeps every sliding layer window-only
    (`W`): the original model itself, as a schedule (its KV plan is the original's)."""
    if sliding not in ("sparse", "window"):
        raise ValueError(f"sliding must be 'sparse' (sliding layers after a global layer become sparse layers) or "
                         f"'window' (every sliding layer stays window-only: the original), got {sliding!r}")
    windows, source = layer_windows(model, example_inputs)
    name = type(model).__name__
    if not any(w is not None for w in windows):
        where = ("its config declares no sliding-window layers" if source == "config" else
                 "the probe measured a causal mask on every layer (give example_inputs longer than the window)")
        raise ValueError(f"Schedule.from_model: {name} has no sliding-window layers ({where}): every layer is "
                         f"global, and from_model keeps global layers full, so no layer would become sparse; use "
                         f"Schedule.hybrid({len(windows)}, ratio) or Schedule.from_pattern(...)")
    letters, seen_full = [], False
    promote_first = all(w is not None for w in windows) and sliding == "sparse"
    if promote_first:
        log.warning("Schedule.from_model: every layer of %s is a sliding-window layer (window %s); layer 0 becomes a "
                    "full layer (it attends to the whole prefix, so outputs differ from the original beyond %d "
                    "tokens) and the others sparse layers reading it", name, windows[0], windows[0])
    for i, w in enumerate(windows):
        if w is None or (i == 0 and promote_first):
            letters.append("F")
            seen_full = True
        else:
            letters.append("S" if seen_full and sliding == "sparse" else "W")
    user_overrides = dict(options.pop("overrides", None) or {})
    user_window = "window" in options  # replaces the original window of the S layers (W layers keep theirs)
    if not user_window:
        options["window"] = Counter(w for w, x in zip(windows, letters) if x != "F").most_common(1)[0][0]
    overrides: dict[int, dict[str, Any]] = {}
    for i, (w, letter) in enumerate(zip(windows, letters)):
        keep_original = letter == "W" or (letter == "S" and not user_window)
        if keep_original and w != options["window"]:
            overrides[i] = {"window": w}
    for key, fields in user_overrides.items():
        overrides.setdefault(int(key), {}).update(fields)
    schedule = cls.from_pattern("".join(letters), overrides=overrides, **options)
    log.info("Schedule.from_model: %s layer windows (%s) %s -> pattern %s", name, source, windows, schedule.pattern)
    return schedule

