"""Reading the byte corpus (`prepare_data.py`'s train.bin / val.bin) and the key-value "needle" retrieval probe.

    >>> data = Corpus("examples/paper_miniature/data")
    >>> x = data.batch("train", np.random.default_rng(0), batch=8, length=4097, needle_rate=0.05)  # uint8 [8, 4097]
    >>> probe = needle_probe(data.val, np.random.default_rng(1), context=4096, depth=0.5, distractors=2)

The needle is a line of Python, `KEY_ab3k9 = "x7qm2z"`, planted in real code; the query at the end repeats
`KEY_ab3k9 = "` and the model must continue with the six value bytes. `distractors` more KEY lines with other keys
and values are planted too, so the model must match the key, not just copy the last KEY line (RULER's
single-needle vs multi-key). Training mixes KEY lines and their queries into `needle_rate` of its sequences: 1 to
context/256 pairs each (so a needle sequence holds up to 16 queries at 4k, the others acting as distractors), lines
and queries at random positions (`needle_pairs` changes the maximum: a retrieval-heavy mix). Evaluation plants one
needle at a depth (0 = first bytes of the context, 1 = right before the query) and queries it at the end; each probe
also keeps a control copy without the needle line, so the value's loss with and without the needle can be compared.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

KEY_CHARS = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", dtype=np.uint8)
VALUE_CHARS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789", dtype=np.uint8)
KEY_LEN, VALUE_LEN = 5, 6


class Corpus:
    """train / val byte arrays (memory-mapped) of a prepared data folder."""

    def __init__(self, folder):
        self.folder = Path(folder)
        manifest = self.folder / "manifest.json"
        if not manifest.exists():
            raise FileNotFoundError(f"{manifest} is missing: run prepare_data.py --out {self.folder} first")
        self.manifest = json.loads(manifest.read_text())
        self.train = np.memmap(self.folder / "train.bin", dtype=np.uint8, mode="r")
        self.val = np.memmap(self.folder / "val.bin", dtype=np.uint8, mode="r")

    def split(self, name: str) -> np.ndarray:
        return self.train if name == "train" else self.val

    def batch(self, split: str, rng: np.random.Generator, *, batch: int, length: int,
              needle_rate: float = 0.0, needle_pairs: int | None = None) -> np.ndarray:
        """uint8 [batch, length] random windows; `needle_rate` of the rows get 1 to `needle_pairs` planted
        key-value pairs, each queried later in the row (default length // 256 pairs: 16 at 4k)."""
        data = self.split(split)
        if len(data) <= length:
            raise ValueError(f"{split}.bin has {len(data)} bytes, fewer than one window of {length}: prepare more "
                             f"data or use a shorter --context")
        starts = rng.integers(0, len(data) - length, size=batch)
        rows = np.stack([np.asarray(data[s:s + length]) for s in starts])
        max_pairs = needle_pairs or max(1, length // 256)  # default: up to 16 key-value pairs at 4k
        for i in np.nonzero(rng.random(batch) < needle_rate)[0]:
            plant_training_needle(rows[i], rng, pairs=int(rng.integers(1, max_pairs + 1)))
        return rows

    def fixed_windows(self, split: str, *, count: int, length: int, seed: int = 1234) -> np.ndarray:
        """uint8 [count, length]: the same held-out windows for every model (evaluation)."""
        return self.batch(split, np.random.default_rng(seed), batch=count, length=length)


def _random(chars: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return chars[rng.integers(0, len(chars), size=n)]


def _line(key: np.ndarray, value: np.ndarray) -> np.ndarray:
    """`\\nKEY_<key> = "<value>"\\n` as bytes."""
    return np.concatenate([np.frombuffer(b'\nKEY_', np.uint8), key, np.frombuffer(b' = "', np.uint8), value,
                           np.frombuffer(b'"\n', np.uint8)])


def _query(key: np.ndarray) -> np.ndarray:
    """`\\nKEY_<key> = "` as bytes: what precedes the value the model must recall."""
    return np.concatenate([np.frombuffer(b'\nKEY_', np.uint8), key, np.frombuffer(b' = "', np.uint8)])


LINE_LEN = len(_line(np.zeros(KEY_LEN, np.uint8), np.zeros(VALUE_LEN, np.uint8)))
QUERY_LEN = len(_query(np.zeros(KEY_LEN, np.uint8)))


def _free_slots(row_len: int, taken: list[tuple[int, int]], width: int, rng, lo: int, hi: int, tries: int = 50):
    """A start in [lo, hi - width] whose span [start, start + width) overlaps nothing in `taken`, or None."""
    for _ in range(tries):
        if hi - width <= lo:
            return None
        s = int(rng.integers(lo, hi - width + 1))
        if all(s + width <= a or s >= b for a, b in taken):
            return s
    return None


def _keys(rng, n: int) -> list[np.ndarray]:
    keys: list[np.ndarray] = []
    while len(keys) < n:
        k = _random(KEY_CHARS, KEY_LEN, rng)
        if all(not np.array_equal(k, other) for other in keys):
            keys.append(k)
    return keys


def plant_training_needle(row: np.ndarray, rng: np.random.Generator, *, pairs: int = 1) -> None:
    """In place: `pairs` KEY lines at random positions, each queried (key, then its value) somewhere after it.
    With several pairs the others act as distractors for each query."""
    n, qv = len(row), QUERY_LEN + VALUE_LEN
    taken: list[tuple[int, int]] = []
    for key in _keys(rng, pairs):
        value = _random(VALUE_CHARS, VALUE_LEN, rng)
        s = _free_slots(n, taken, LINE_LEN, rng, 0, n - qv)
        if s is None:
            continue
        q = _free_slots(n, taken + [(s, s + LINE_LEN)], qv, rng, s + LINE_LEN, n)
        if q is None:
            continue
        row[s:s + LINE_LEN] = _line(key, value)
        row[q:q + QUERY_LEN] = _query(key)
        row[q + QUERY_LEN:q + qv] = value
        taken += [(s, s + LINE_LEN), (q, q + qv)]


@dataclass
class Probe:
    tokens: np.ndarray  # uint8 [context]: filler code, KEY lines, and at the end the query + value
    value_start: int  # first value byte's position (the last VALUE_LEN bytes)
    needle_start: int  # where the needle line starts
    distance: int  # value_start - needle_start: how far back the model must look
    control: np.ndarray | None = None  # the same tokens without the needle line (the filler left there): the
    # value's loss on it is what the model predicts without retrieving; the difference is what it retrieved


def needle_probe(val: np.ndarray, rng: np.random.Generator, *, context: int, depth: float,
                 distractors: int = 0) -> Probe:
    """A held-out window of `context` bytes with the needle at `depth` in [0, 1] and the query at the end."""
    start = int(rng.integers(0, len(val) - context))
    row = np.array(val[start:start + context])
    filler = row.copy()
    value_start = context - VALUE_LEN
    q_start = value_start - QUERY_LEN
    keys = _keys(rng, 1 + distractors)
    values = [_random(VALUE_CHARS, VALUE_LEN, rng) for _ in keys]
    row[q_start:value_start] = _query(keys[0])
    row[value_start:] = values[0]
    needle_start = int(round(depth * (q_start - LINE_LEN)))
    row[needle_start:needle_start + LINE_LEN] = _line(keys[0], values[0])
    taken = [(needle_start, needle_start + LINE_LEN), (q_start, context)]
    for key, value in zip(keys[1:], values[1:]):
        s = _free_slots(context, taken, LINE_LEN, rng, 0, q_start)
        if s is not None:
            row[s:s + LINE_LEN] = _line(key, value)
            taken.append((s, s + LINE_LEN))
    control = row.copy()
    control[needle_start:needle_start + LINE_LEN] = filler[needle_start:needle_start + LINE_LEN]
    return Probe(row, value_start, needle_start, value_start - needle_start, control)


def probe_set(val: np.ndarray, *, context: int, depths, samples: int, distractors: int,
              seed: int = 4321) -> list[list[Probe]]:
    """`samples` probes per depth (the same for every model: seeded)."""
    rng = np.random.default_rng(seed + 1000 * distractors)
    return [[needle_probe(val, rng, context=context, depth=d, distractors=distractors) for _ in range(samples)]
            for d in depths]


def as_text(row: np.ndarray) -> str:
    return bytes(row).decode("utf-8", errors="replace")
