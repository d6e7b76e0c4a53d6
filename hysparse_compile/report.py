"""`inspect(compiled) -> Report`: what the compiler did — layer roles, K/V and index edges, the graph after every
pass, the KV plan — as a table (`str(report)`), DOT (`report.to_dot()`), SVG (`report.to_svg()`) or HTML.

    >>> report = hysparse_compile.inspect(compiled)
    >>> report.roles            # ('full', 'sparse', 'sparse', 'sparse')
    >>> report.edges            # ((0, 1, 'kv'), (0, 1, 'indices'), ...)
    >>> print(report)
"""
from __future__ import annotations

import html
import io
import shutil
import subprocess
from dataclasses import dataclass, field

EDGE_COLORS = {"kv": "#1f77b4", "indices": "#d62728"}


@dataclass(frozen=True)
class LayerInfo:
    index: int
    module: str  # the attention module path in the original model
    role: str  # "full" | "sparse"
    source: str  # "sdpa" | "softmax": how the original computed attention
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    kv_source: int | None
    window: int | None
    kv_sharing: str | None
    gate: str | None
    sinks: bool
    merge: bool


@dataclass(frozen=True)
class Report:
    """The compiler's record of one compile (see the module docstring)."""

    roles: tuple[str, ...]  # per attention layer, "full" | "sparse"
    edges: tuple[tuple[int, int, str], ...]  # (src_layer, dst_layer, "kv" | "indices")
    graphs: dict  # pass name -> the graph after that pass (readable Python)
    kv_plan: object
    layers: tuple[LayerInfo, ...]
    new_parameters: dict = field(default_factory=dict)  # qualified name -> shape
    schedule: object = None
    backend: str = "auto"
    padding: bool = False

    def table(self):
        from rich.table import Table

        t = Table(title=f"HySparse compile: pattern {self.schedule.pattern!r}, backend {self.backend!r}, "
                        f"padding roll {'on' if self.padding else 'off'}")
        for col in ("layer", "module", "was", "role", "Hq/Hkv/d", "scale", "reads from", "window", "kv_sharing",
                    "gate", "sinks"):
            t.add_column(col)
        for info in self.layers:
            sparse = info.role == "sparse"
            reads = "-" if not sparse else (f"L{info.kv_source} indices" + (" + K/V" if any(
                e == (info.kv_source, info.index, "kv") for e in self.edges) else ""))
            t.add_row(str(info.index), info.module, info.source, info.role + (" (merge)" if info.merge else ""),
                      f"{info.heads}/{info.kv_heads}/{info.head_dim}", f"{info.scale:.4g}", reads,
                      str(info.window) if sparse else "-", info.kv_sharing if sparse else "-",
                      (info.gate or "-") if sparse and not info.merge else "-",
                      ("yes" if info.sinks else "no") if sparse else "-")
        return t

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        console = Console(file=buf, width=160, color_system=None, force_terminal=False)
        console.print(self.table())
        n_new = len(self.new_parameters)
        console.print(f"edges: {len(self.edges)} ({sum(e[2] == 'kv' for e in self.edges)} kv, "
                      f"{sum(e[2] == 'indices' for e in self.edges)} indices); new parameters: {n_new}"
                      + (f" (e.g. {next(iter(self.new_parameters))} {tuple(next(iter(self.new_parameters.values())))})"
                         if n_new else ""))
        console.print(f"passes: {', '.join(self.graphs)}")
        if self.kv_plan is not None:
            console.print(str(self.kv_plan))
        return buf.getvalue()

    def to_dot(self) -> str:
        """The layer graph in Graphviz DOT: one node per attention layer, edges for shared K/V and indices."""
        lines = ["digraph hysparse {", "  rankdir=TB;", "  node [shape=box, style=filled, fontname=Helvetica];"]
        for info in self.layers:
            fill = "#ffd8a8" if info.role == "full" else "#d0ebff"
            lines.append(f'  L{info.index} [label="L{info.index} {info.role}\\n{info.module}", fillcolor="{fill}"];')
        for a, b in zip(self.layers, self.layers[1:]):
            lines.append(f"  L{a.index} -> L{b.index} [color=gray, style=dotted, arrowhead=none];")
        for src, dst, kind in self.edges:
            lines.append(f'  L{src} -> L{dst} [label="{kind}", color="{EDGE_COLORS[kind]}", '
                         f'fontcolor="{EDGE_COLORS[kind]}"];')
        lines.append("}")
        return "\n".join(lines) + "\n"

    def to_svg(self) -> str:
        """SVG of the layer graph: rendered by graphviz's `dot` when installed, else a small built-in drawing."""
        dot = shutil.which("dot")
        if dot:
            try:
                res = subprocess.run([dot, "-Tsvg"], input=self.to_dot(), capture_output=True, text=True, timeout=30)
                if res.returncode == 0 and "<svg" in res.stdout:
                    return res.stdout
            except (OSError, subprocess.SubprocessError):
                pass
        return self._fallback_svg()

    def _fallback_svg(self) -> str:
        row, box_w, box_h, left = 44, 300, 30, 40
        height = 20 + row * len(self.layers)
        out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + box_w + 220}" height="{height}" '
               f'font-family="Helvetica" font-size="12">']
        y = {info.index: 10 + row * i for i, info in enumerate(self.layers)}
        for info in self.layers:
            fill = "#ffd8a8" if info.role == "full" else "#d0ebff"
            out.append(f'<rect x="{left}" y="{y[info.index]}" width="{box_w}" height="{box_h}" rx="4" fill="{fill}" '
                       f'stroke="#333"/>')
            out.append(f'<text x="{left + 8}" y="{y[info.index] + 19}">L{info.index} {info.role} — '
                       f'{html.escape(info.module)}</text>')
        for src, dst, kind in self.edges:
            y0, y1 = y[src] + box_h / 2, y[dst] + box_h / 2
            bend = left + box_w + (48 if kind == "kv" else 66) + 12 * (dst - src)  # longer edges bow further out
            out.append(f'<path d="M{left + box_w},{y0} C{bend},{y0} {bend},{y1} {left + box_w},{y1}" fill="none" '
                       f'stroke="{EDGE_COLORS[kind]}" stroke-width="1.5">'
                       f'<title>{kind}: L{src} -> L{dst}</title></path>')
        out.append(f'<text x="{left + box_w + 60}" y="{height - 8}" fill="{EDGE_COLORS["kv"]}">kv</text>')
        out.append(f'<text x="{left + box_w + 90}" y="{height - 8}" fill="{EDGE_COLORS["indices"]}">indices</text>')
        out.append("</svg>")
        return "\n".join(out) + "\n"

    def to_html(self) -> str:
        """A self-contained page: the layer diagram, the table and every pass's graph."""
        graphs = "\n".join(f"<details><summary>{html.escape(name)}</summary><pre>{html.escape(text)}</pre></details>"
                           for name, text in self.graphs.items())
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>HySparse compile report</title></head>"
                f"<body><h1>HySparse compile report</h1>{self.to_svg()}<pre>{html.escape(str(self))}</pre>"
                f"<h2>Graphs after each pass</h2>{graphs}</body></html>\n")


def inspect(compiled) -> Report:
    """The `Report` of a module returned by `hysparse_compile.compile`."""
    state = getattr(compiled, "compile_state", None)
    if state is None:
        raise TypeError(f"inspect takes a module returned by hysparse_compile.compile, got {type(compiled).__name__}")
    layers = tuple(
        LayerInfo(index=site.index, module=site.module, role=spec.role, source=site.kind, heads=site.heads,
                  kv_heads=site.kv_heads, head_dim=site.head_dim, scale=site.scale, kv_source=spec.kv_source,
                  window=spec.window, kv_sharing=spec.kv_sharing, gate=spec.gate, sinks=spec.sinks and not spec.merge,
                  merge=spec.merge)
        for site, spec in zip(state.sites, state.specs))
    return Report(roles=tuple(spec.role for spec in state.specs), edges=tuple(state.edges), graphs=dict(state.graphs),
                  kv_plan=state.kv_plan, layers=layers,
                  new_parameters={k: tuple(p.shape) for k, p in state.new_parameters.items()},
                  schedule=state.schedule, backend=state.backend, padding=state.padding)
