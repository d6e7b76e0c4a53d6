"""The HySparse schedule: which attention layers are full and which are sparse, and the sparse-attention knobs.

A `Schedule` is a frozen, validated value. Build it from a pattern string, from `hybrid(num_layers, ratio)`, from a
named preset, or from a YAML / TOML / JSON file; print it back with `dump` (the file round-trips to an equal value).

    >>> s = Schedule.from_pattern("F S S S F", topk=512)
    >>> s.pattern, s.num_full, s.layers[2].kv_source
    ('FSSSF', 2, 0)
    >>> Schedule.hybrid(49, 11).num_full
    5

Per-layer overrides are a mapping from layer index to a dict of fields, e.g. `overrides={5: {"window": 256}}`.
Sparse layers may override `window`, `swa`, `sinks`, `gate` and `kv_sharing`; full layers may override `topk`
(how many tokens they select for the sparse layers that follow). `block_size` is global: the indices a full
layer hands to its sparse layers are counted in blocks.

Two more things a schedule can say, for models that already have sliding-window layers (`Schedule.from_model`):
- `W` in the pattern: a **window-only** layer — its own sliding-window attention over its own K/V, no block
  selection, no shared K/V, no gates or new sinks. It needs no full layer before it (the sliding layers of Gemma 3 or
  gpt-oss that come before their first global layer become `W`). It may override `window` only.
- `topk=0`: the full layers select nothing. Valid only with `mode="training_free"`, where a sparse layer's single
  softmax then covers its window alone: the original sliding-window layer, exactly.

    >>> Schedule.from_pattern("W F S", topk=0, mode="training_free").layers[0].role
    'sparse'
"""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

KV_SHARING = ("sparse_branch", "none", "both")
GATES = ("element", "head", "none")
MODES = ("paper", "training_free")
SPARSE_OVERRIDES = ("window", "swa", "sinks", "gate", "kv_sharing")
FULL_OVERRIDES = ("topk",)
WINDOW_OVERRIDES = ("window",)
LETTERS = {"F": "full", "S": "sparse", "W": "window-only"}
FILE_KEYS = ("pattern", "block_size", "topk", "window", "kv_sharing", "swa", "sinks", "gate", "mode", "overrides")

# What each mode means when the user leaves an option unset.
_MODE_DEFAULTS = {
    "paper": {"kv_sharing": "sparse_branch", "swa": True, "sinks": True, "gate": "element"},
    "training_free": {"kv_sharing": "none", "swa": True, "sinks": False, "gate": "none"},
}


@dataclass(frozen=True)
class LayerSpec:
    """One attention layer's resolved role and options (overrides applied)."""

    index: int
    role: str  # "full" | "sparse" (window-only layers are sparse layers with no kv_source and topk 0)
    kv_source: int | None  # the full layer a sparse layer reads K/V and indices from; None for full and W layers
    block_size: int
    topk: int  # full: tokens selected; sparse: tokens its kv_source selects
    window: int | None  # SWA window, None when the SWA branch is off (and for full layers)
    kv_sharing: str
    sinks: bool
    gate: str
    merge: bool  # training-free: one softmax over selected blocks ∪ window of the layer's own K/V

    @property
    def nsel(self) -> int:
        """Blocks selected per token and KV group (0: nothing is selected)."""
        return self.topk // self.block_size

    @property
    def window_only(self) -> bool:
        """A `W` layer: its own sliding window and nothing else (no source, no selection, no gates)."""
        return self.role == "sparse" and self.kv_source is None


def _check_int(name: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false, got {value!r} ({type(value).__name__})")
    return value


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        hint = difflib.get_close_matches(str(value), choices, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}{extra}")
    return value


def _check_block_size(value: Any) -> int:
    _check_int("block_size", value)
    if value < 16 or value & (value - 1):
        raise ValueError(f"block_size must be a power of two >= 16 (16, 32, 64, 128, ...), got {value}")
    return value


def _check_topk(name: str, value: Any, block_size: int, mode: str = "paper") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer number of tokens, got {value!r} ({type(value).__name__})")
    if value == 0 and mode != "training_free":
        raise ValueError(
            f"{name}=0 selects no blocks, which is valid only with mode='training_free' (each sparse layer's softmax "
            f"then covers its own window alone: the original sliding-window layer, e.g. "
            f"Schedule.from_model(model, mode='training_free', topk=0)); with mode={mode!r} give a positive multiple "
            f"of block_size={block_size} (e.g. {block_size * 16}), or make a layer window-only with 'W' in the pattern"
        )
    if value == 0:
        return value
    if value < 0 or value % block_size:
        raise ValueError(
            f"{name} must be a positive multiple of block_size={block_size} (e.g. {block_size * 16}), got {value}"
        )
    return value


def normalize_pattern(pattern: Any) -> str:
    """'F S s S' -> 'FSSS'. Raises on anything but F/S/W letters and whitespace, and on a sparse layer before any
    full layer."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a string of F, S and W letters, got {pattern!r} ({type(pattern).__name__})")
    letters = "".join(pattern.split()).upper()
    if not letters:
        raise ValueError("pattern is empty: give one letter per attention layer, F (full) or S (sparse), e.g. 'FSSS'")
    bad = sorted({c for c in letters if c not in LETTERS})
    if bad:
        pos = next(i for i, c in enumerate(letters) if c in bad)
        raise ValueError(
            f"pattern has unknown letter(s) {', '.join(map(repr, bad))} (first at layer {pos}); "
            f"only F (full), S (sparse) and W (window-only) are valid, got {pattern!r}"
        )
    first_s, first_f = letters.find("S"), letters.find("F")
    if first_s >= 0 and (first_f < 0 or first_s < first_f):
        where = "starts with a sparse layer" if first_s == 0 else "has a sparse layer before any full layer"
        raise ValueError(
            f"pattern {where}: layer {first_s} is 'S' but a sparse layer reads K/V and indices from the most recent "
            f"full layer before it, and there is none; start with 'F' (or make the leading layers window-only, "
            f"'W'), got {pattern!r}"
        )
    return letters


@dataclass(frozen=True)
class Schedule:
    """A validated HySparse layer schedule. Construct with `from_pattern`, `hybrid`, `preset` or `load`."""

    pattern: str
    block_size: int = 64
    topk: int = 1024
    window: int = 128
    kv_sharing: str | None = None
    swa: bool | None = None
    sinks: bool | None = None
    gate: str | None = None
    mode: str = "paper"
    overrides: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass normalization)
        set_("pattern", normalize_pattern(self.pattern))
        _check_choice("mode", self.mode, MODES)
        _check_block_size(self.block_size)
        _check_topk("topk", self.topk, self.block_size, self.mode)
        _check_int("window", self.window)
        defaults = _MODE_DEFAULTS[self.mode]
        for name in ("kv_sharing", "swa", "sinks", "gate"):
            if getattr(self, name) is None:
                set_(name, defaults[name])
        _check_choice("kv_sharing", self.kv_sharing, KV_SHARING)
        _check_bool("swa", self.swa)
        _check_bool("sinks", self.sinks)
        _check_choice("gate", self.gate, GATES)
        if self.mode == "training_free":
            _reject_training_free_conflicts(self.__dict__, where="")
        set_("overrides", self._normalize_overrides(self.overrides))
        self.layers  # resolve once so per-layer errors surface at construction

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pattern(cls, pattern: str, **options: Any) -> "Schedule":
        """`Schedule.from_pattern("F S S S", block_size=64, topk=1024, window=128, ...)`; spaces are ignored."""
        return cls(pattern=pattern, **_check_option_names(options))

    @classmethod
    def hybrid(cls, num_layers: int, ratio: int, **options: Any) -> "Schedule":
        """Full layers at `i % (ratio + 1) == 0`, the last layer forced full (the paper's final full layer).

        `hybrid(36, 3)` is the paper's 7B schedule, `hybrid(49, 11)` the 80B-A3B one (5 full layers).
        """
        _check_int("num_layers", num_layers)
        _check_int("ratio", ratio, minimum=0)
        roles = ["F" if i % (ratio + 1) == 0 or i == num_layers - 1 else "S" for i in range(num_layers)]
        return cls.from_pattern("".join(roles), **options)

    @classmethod
    def from_model(cls, model: Any, *, example_inputs: Any = None, sliding: str = "sparse",
                   **options: Any) -> "Schedule":
        """The schedule that keeps a model's own layer types: its global layers stay full (`F`), its sliding-window
        layers become sparse layers (`S`) whose SWA branch is the original window, those before the first global
        layer window-only layers (`W`). Layer types come from the HF config (`layer_types`, `sliding_window_pattern`,
        `sliding_window` / `use_sliding_window`), else from the masks measured on the captured graph
        (`example_inputs` then sets the probe length, which must exceed the window). `window=` replaces the
        original window of the sparse layers; the other options are those of `from_pattern`. A model whose every
        layer is sliding (Mistral with `sliding_window`) gets layer 0 full, attending to the whole prefix (warned).
        `sliding="window"` keeps every sliding layer window-only instead: the original as a schedule, e.g. for its
        KV plan (`plan_kv`).

            >>> s = Schedule.from_model(gemma3, mode="training_free", topk=0)   # reproduces gemma3 exactly
            >>> s = Schedule.from_model(gpt_oss, topk=1024)                       # Hybrid-SWA upgraded to HySparse

        See docs/compiler.md, "Hybrid-SWA models: Schedule.from_model".
        """
        from .hybrid_swa import schedule_from_model

        return schedule_from_model(cls, model, example_inputs=example_inputs, sliding=sliding,
                                   options=_check_option_names(options))

    @classmethod
    def preset(cls, name: str, **options: Any) -> "Schedule":
        """A named preset (see `Schedule.presets()`), optionally with options replaced."""
        if name not in PRESETS:
            hint = difflib.get_close_matches(name, list(PRESETS), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(f"unknown preset {name!r}{extra}; valid presets: {', '.join(PRESETS)}")
        num_layers, ratio, description = PRESETS[name]
        return cls.hybrid(num_layers, ratio, **options)

    @staticmethod
    def presets() -> dict[str, str]:
        """Preset name -> one-line description."""
        return {name: desc for name, (_, _, desc) in PRESETS.items()}

    # ------------------------------------------------------------------ resolved view
    def __len__(self) -> int:
        return len(self.pattern)

    @property
    def num_full(self) -> int:
        return self.pattern.count("F")

    @property
    def num_sparse(self) -> int:
        """Sparse layers, window-only (`W`) layers included: every layer that is not full."""
        return len(self.pattern) - self.pattern.count("F")

    @property
    def nsel(self) -> int:
        return self.topk // self.block_size

    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        """Every layer's resolved spec, overrides applied, in order."""
        specs, last_full, full_topk = [], None, {}
        for i, letter in enumerate(self.pattern):
            o = self.overrides.get(i, {})
            if letter == "F":
                last_full = i
                full_topk[i] = o.get("topk", self.topk)
                specs.append(LayerSpec(i, "full", None, self.block_size, full_topk[i], None, self.kv_sharing,
                                       False, "none", False))
            elif letter == "W":  # its own window over its own K/V: selects nothing, reads nothing shared
                specs.append(LayerSpec(i, "sparse", None, self.block_size, 0, o.get("window", self.window), "none",
                                       False, "none", False))
            else:
                swa = o.get("swa", self.swa)
                specs.append(LayerSpec(
                    i, "sparse", last_full, self.block_size, full_topk[last_full],
                    o.get("window", self.window) if swa else None, o.get("kv_sharing", self.kv_sharing),
                    o.get("sinks", self.sinks), o.get("gate", self.gate), self.mode == "training_free",
                ))
        return tuple(specs)

    def replace(self, **changes: Any) -> "Schedule":
        """A copy with fields changed (validated again)."""
        return dataclasses.replace(self, **_check_option_names(changes, allow_pattern=True))

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        """Plain data in file form (override keys are strings, as TOML and JSON need)."""
        d = {k: getattr(self, k) for k in FILE_KEYS if k != "overrides"}
        if self.overrides:
            d["overrides"] = {str(i): dict(o) for i, o in sorted(self.overrides.items())}
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "schedule") -> "Schedule":
        if not isinstance(data, Mapping):
            raise TypeError(f"{source}: expected a mapping of schedule fields, got {type(data).__name__}")
        for key in data:
            if key not in FILE_KEYS:
                hint = difflib.get_close_matches(str(key), FILE_KEYS, n=1)
                extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise ValueError(f"{source}: unknown key {key!r}{extra}; valid keys: {', '.join(FILE_KEYS)}")
        if "pattern" not in data:
            raise ValueError(f"{source}: missing key 'pattern' (a string of F and S letters, one per layer)")
        return cls(**dict(data))

    @classmethod
    def load(cls, path: str | Path) -> "Schedule":
        """Load from .yaml/.yml, .toml or .json (YAML through `yaml.safe_load`)."""
        path = Path(path)
        fmt = _format_of(path)
        text = path.read_text()
        try:
            if fmt == "yaml":
                import yaml

                data = yaml.safe_load(text)
            elif fmt == "toml":
                data = _tomllib().loads(text)
            else:
                data = json.loads(text)
        except Exception as e:  # parser errors: say which file
            raise ValueError(f"{path}: not valid {fmt.upper()}: {e}") from e
        return cls.from_dict(data, source=str(path))

    def dump(self, path: str | Path) -> Path:
        """Write to .yaml/.yml, .toml or .json; `Schedule.load(path) == self`."""
        path = Path(path)
        path.write_text(self.dumps(_format_of(path)))
        return path

    def dumps(self, fmt: str = "yaml") -> str:
        data = self.to_dict()
        if fmt == "yaml":
            import yaml

            return yaml.safe_dump(data, sort_keys=False)
        if fmt == "toml":
            import tomli_w

            return tomli_w.dumps(data)
        if fmt == "json":
            return json.dumps(data, indent=2) + "\n"
        raise ValueError(f"format must be 'yaml', 'toml' or 'json', got {fmt!r}")

    # ------------------------------------------------------------------ helpers
    def _normalize_overrides(self, overrides: Any) -> dict[int, dict[str, Any]]:
        if overrides is None:
            return {}
        if not isinstance(overrides, Mapping):
            raise TypeError(f"overrides must be a mapping {{layer_index: {{field: value}}}}, got {overrides!r}")
        out: dict[int, dict[str, Any]] = {}
        for key, fields in overrides.items():
            try:
                i = int(key) if not isinstance(key, bool) else None
            except (TypeError, ValueError):
                i = None
            if i is None or str(i) != str(key).strip():
                raise ValueError(f"overrides: layer key must be an integer layer index, got {key!r}")
            if not 0 <= i < len(self.pattern):
                raise ValueError(f"overrides: layer {i} is out of range; the pattern has layers 0..{len(self.pattern) - 1}")
            if not isinstance(fields, Mapping):
                raise TypeError(f"overrides[{i}] must be a mapping of field -> value, got {fields!r}")
            role, allowed = {"F": ("full", FULL_OVERRIDES), "S": ("sparse", SPARSE_OVERRIDES),
                             "W": ("window-only", WINDOW_OVERRIDES)}[self.pattern[i]]
            where = f"overrides[{i}] ({role} layer)"
            for name, value in fields.items():
                if name not in allowed:
                    raise ValueError(
                        f"{where}: field {name!r} cannot be overridden on a {role} layer; "
                        f"valid fields for a {role} layer: {', '.join(allowed)}"
                    )
                if name == "topk":
                    _check_topk(f"{where}.topk", value, self.block_size, self.mode)
                elif name == "window":
                    _check_int(f"{where}.window", value)
                elif name in ("swa", "sinks"):
                    _check_bool(f"{where}.{name}", value)
                elif name == "gate":
                    _check_choice(f"{where}.gate", value, GATES)
                elif name == "kv_sharing":
                    _check_choice(f"{where}.kv_sharing", value, KV_SHARING)
            if self.mode == "training_free":
                _reject_training_free_conflicts(fields, where=f"{where}: ")
            out[i] = dict(fields)
        return out


def _reject_training_free_conflicts(fields: Mapping[str, Any], *, where: str) -> None:
    """training_free has no gates, no sinks, and reads each layer's own K/V: refuse options that say otherwise."""
    required = _MODE_DEFAULTS["training_free"]
    for name in ("kv_sharing", "sinks", "gate"):
        if name in fields and fields[name] is not None and fields[name] != required[name]:
            raise ValueError(
                f"{where}{name}={fields[name]!r} contradicts mode='training_free', which adds no new weights and "
                f"reads each sparse layer's own K/V (it needs {name}={required[name]!r}); "
                f"drop the option or use mode='paper'"
            )


def _check_option_names(options: Mapping[str, Any], *, allow_pattern: bool = False) -> dict[str, Any]:
    valid = FILE_KEYS if allow_pattern else tuple(k for k in FILE_KEYS if k != "pattern")
    for key in options:
        if key not in valid:
            hint = difflib.get_close_matches(key, valid, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise TypeError(f"unknown schedule option {key!r}{extra}; valid options: {', '.join(valid)}")
    return dict(options)


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    formats = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".json": "json"}
    if suffix not in formats:
        raise ValueError(f"{path}: unknown schedule file type {suffix!r}; use .yaml, .yml, .toml or .json")
    return formats[suffix]


def _tomllib():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib


# name -> (num_layers, full:sparse ratio, description); the paper's Table 1.
PRESETS: dict[str, tuple[int, int, str]] = {
    "hysparse-7b": (36, 3, "paper 7B dense: 36 layers, 1:3 full:sparse, last layer full (10 full, 26 sparse)"),
    "hysparse-80b-a3b": (49, 11, "paper 80B-A3B MoE: 49 layers, 1:11 full:sparse, last layer full (5 full, 44 sparse)"),
}
