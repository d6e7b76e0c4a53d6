"""Byte-level corpus for the miniature: the Python source of the standard library and of site-packages.

    python examples/paper_miniature/prepare_data.py --out examples/paper_miniature/data          # 48 + 4 MiB
    python examples/paper_miniature/prepare_data.py --out data --file-list data/files.tsv        # the same files again
    python examples/paper_miniature/prepare_data.py --out /tmp/pm_data --smoke                    # 256 + 64 KiB, ~1 s

Writes `train.bin` and `val.bin` (uint8, one byte per token, vocab 256; files joined by a NUL byte, which Python
source never contains), `manifest.json` (sources, sizes, checksums, held-out packages) and `files.tsv` (split,
package, size, path of every file used: `--file-list` reads it back, so the exact corpus can be rebuilt on a machine
with the same files, or prepared here and carried).

Deterministic: the file list is sorted; a package (the first path component under its root: `asyncio`, `json`,
`numpy`, ...) is held out when the first 8 hex digits of sha1(name) / 2**32 < --val-fraction, so a package's files
are all on one side; when a side has more than its cap, files are taken in sha1(path) order (no bias toward early
names) until the cap, then written in sorted order.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

MIB = 2**20
SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", ".git"}
MAX_FILE_BYTES = 512 * 1024  # generated tables (unicode data, vendored blobs) would dominate a small corpus


def default_roots(smoke: bool) -> list[Path]:
    """The standard library, then site-packages (purelib, platlib), each once."""
    paths = sysconfig.get_paths()
    roots = [Path(paths["stdlib"])] + ([] if smoke else [Path(paths["purelib"]), Path(paths["platlib"])])
    out = []
    for r in roots:
        r = r.resolve()
        if r.is_dir() and r not in out:
            out.append(r)
    return out


def walk_python_files(root: Path) -> list[tuple[str, Path]]:
    """(package, path) of every *.py under root, sorted by relative path; package = first path component."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = Path(dirpath) / name
                rel = path.relative_to(root)
                found.append((rel.parts[0].removesuffix(".py"), path))
    return sorted(found, key=lambda item: item[1].relative_to(root).as_posix())


def unit_hash(text: str) -> float:
    """A deterministic number in [0, 1) from text."""
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) / 2**32


def read_file_list(path: Path) -> list[tuple[str | None, str, Path]]:
    """Lines `split<TAB>package<TAB>size<TAB>path` (as written to files.tsv) or a bare path per line."""
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) >= 4:
            rows.append((parts[0], parts[1], Path(parts[3])))
        else:
            p = Path(parts[-1])
            rows.append((None, p.parent.name if p.name == "__init__.py" else p.stem, p))
    return rows


def pick(files: list[tuple[str, Path, int]], cap: int) -> list[tuple[str, Path, int]]:
    """Files in sha1(path) order until `cap` bytes, returned in sorted path order."""
    chosen, total = [], 0
    for item in sorted(files, key=lambda it: hashlib.sha1(str(it[1]).encode()).hexdigest()):
        if total + item[2] + 1 > cap:
            continue
        chosen.append(item)
        total += item[2] + 1
    return sorted(chosen, key=lambda it: str(it[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    ap.add_argument("--roots", type=Path, nargs="*", help="source folders (default: stdlib and site-packages)")
    ap.add_argument("--file-list", type=Path, help="files.tsv of an earlier run (or one path per line)")
    ap.add_argument("--train-mib", type=float, default=48.0)
    ap.add_argument("--val-mib", type=float, default=4.0)
    ap.add_argument("--val-fraction", type=float, default=0.1, help="share of packages held out")
    ap.add_argument("--smoke", action="store_true", help="stdlib only, 256 KiB train + 64 KiB val")
    args = ap.parse_args(argv)
    console = Console(stderr=True)
    if args.smoke:
        args.train_mib, args.val_mib = min(args.train_mib, 0.25), min(args.val_mib, 1 / 16)
        args.val_fraction = max(args.val_fraction, 0.2)
    train_cap, val_cap = int(args.train_mib * MIB), int(args.val_mib * MIB)

    if args.file_list:
        listed = read_file_list(args.file_list)
        sources = [str(args.file_list)]
    else:
        roots = args.roots or default_roots(args.smoke)
        listed = [(None, pkg, path) for root in roots for pkg, path in walk_python_files(root)]
        sources = [str(r) for r in roots]
    seen, candidates = set(), {"train": [], "val": []}
    with Progress(TextColumn("[bold]scan"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        for split, pkg, path in progress.track(listed):
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if path in seen or size == 0 or size > MAX_FILE_BYTES:
                continue
            seen.add(path)
            split = split or ("val" if unit_hash(pkg) < args.val_fraction else "train")
            candidates[split].append((pkg, path, size))
    if not candidates["val"] and candidates["train"]:  # a tiny file list: hold out the lowest-hash package
        held = min({pkg for pkg, _, _ in candidates["train"]}, key=unit_hash)
        candidates["val"] = [c for c in candidates["train"] if c[0] == held]
        candidates["train"] = [c for c in candidates["train"] if c[0] != held]
    if not candidates["train"] or not candidates["val"]:
        console.print(f"[red]no Python files found under {sources}; pass --roots or --file-list")
        return 1

    args.out.mkdir(parents=True, exist_ok=True)
    manifest = {"format": "uint8 bytes, files joined by NUL (0)", "vocab_size": 256, "sources": sources,
                "python": sys.version.split()[0], "val_fraction": args.val_fraction,
                "caps_bytes": {"train": train_cap, "val": val_cap}, "max_file_bytes": MAX_FILE_BYTES}
    rows = []
    for split, cap in (("train", train_cap), ("val", val_cap)):
        chosen = pick(candidates[split], cap)
        sha, total = hashlib.sha256(), 0
        with open(args.out / f"{split}.bin", "wb") as f, Progress(
                TextColumn(f"[bold]{split:5s}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=console) as progress:
            for pkg, path, _ in progress.track(chosen):
                data = path.read_bytes().replace(b"\0", b"") + b"\0"
                f.write(data)
                sha.update(data)
                total += len(data)
                rows.append(f"{split}\t{pkg}\t{len(data) - 1}\t{path}")
        manifest[split] = {"bytes": total, "files": len(chosen), "packages": len({c[0] for c in chosen}),
                           "candidate_files": len(candidates[split]), "sha256": sha.hexdigest()}
    manifest["val_packages"] = sorted({c[0] for c in pick(candidates["val"], val_cap)})
    (args.out / "files.tsv").write_text("# split\tpackage\tsize\tpath\n" + "\n".join(rows) + "\n")
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    console.print(f"wrote {args.out}: train {manifest['train']['bytes'] / MIB:.2f} MiB "
                  f"({manifest['train']['files']} files, {manifest['train']['packages']} packages), "
                  f"val {manifest['val']['bytes'] / MIB:.2f} MiB ({manifest['val']['files']} files, "
                  f"{manifest['val']['packages']} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
