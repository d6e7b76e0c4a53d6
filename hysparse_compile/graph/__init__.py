"""What the compiled graph is made of besides the passes (`hysparse_compile/passes/`):

- `graph_ops`: the small graph-friendly functions the rewrite inserts around the HySparse ops (padding rolls, the
  sparse layers' gates), plain torch that exports, compiles and differentiates like any other code;
- `portable`: the captured graph's dtype and device constants, which follow `.to(...)` moves of the compiled model.

Neither imports the passes or the runtime: both are read by them (the rewrite inserts `graph_ops` calls, the
runtime's cached calls use its padding helpers, `HySparseModel._apply` uses `portable`).
"""
