"""Benchmarks and GPU checks (not part of the installed package). Run each as a module from the repository root,
`python -m bench.bench_kernels ...`: they import the package and each other as a package, with no `sys.path` edits.
`timer.py` is the one timer every script measures with; `baselines.py` the baselines they compare against."""
