"""bench/memory_peak.py's replay of an allocator trace (the GPU part runs only on a GPU)."""
import pytest

from bench.kernel_options import inductor_config
from bench.memory_peak import grouped, live_at_peak, marker_index, where


def ev(action, addr, size, name="f"):
    return {"action": action, "addr": addr, "size": size,
            "frames": [{"filename": "??", "line": 0, "name": "torch::unwind::unwind()"},
                       {"filename": "CUDACachingAllocator.cpp", "line": 0, "name": "malloc"},
                       {"filename": "/x/torch/nn/functional.py", "line": 1, "name": "linear"},
                       {"filename": "/repo/hysparse_compile/model.py", "line": 7, "name": name}]}


def test_the_peak_and_what_is_live_there():
    trace = [ev("alloc", 1, 100), ev("alloc", 2, 50, "g"), ev("free_requested", 1, 100), ev("free_completed", 1, 100),
             ev("alloc", 3, 30), ev("alloc", 4, 90, "h"), ev("free_requested", 4, 90), ev("alloc", 5, 10),
             ev("free_requested", 9, 7)]  # a free of a block allocated before recording: ignored
    peak, live = live_at_peak(trace)
    assert peak == 170  # 50 + 30 + 90 (later, 50 + 30 + 10 = 90; earlier, 150)
    assert [e["addr"] for e in live] == [4, 2, 3]  # largest first
    assert where(live[0]) == "model.py:7 h"  # C++ frames and torch's own Python frames skipped


def test_an_empty_trace():
    assert live_at_peak([]) == (0, [])


def test_live_bytes_grouped_by_phase_and_frame():
    marker = ev("alloc", 8, 1, "backward_starts")
    trace = [ev("alloc", 1, 100), ev("alloc", 2, 40), marker, ev("free_requested", 8, 1), ev("alloc", 3, 30, "g"),
             ev("alloc", 4, 5, "f"), ev("free_requested", 4, 5), ev("alloc", 5, 1)]
    assert marker_index(trace) == 2
    peak, live = live_at_peak(trace)
    assert peak == 175
    # by phase, site and block size: the backward's f (addr 4) is live at the peak
    assert [r[:4] for r in grouped(trace, live)] == [("forward", "model.py f", 100, 1), ("forward", "model.py f", 40, 1),
                                                     ("backward", "model.py g", 30, 1), ("backward", "model.py f", 5, 1)]
    assert grouped(trace, live)[0][4].startswith("line 7")
    assert marker_index(trace[:2]) == 2  # no marker: everything is forward


def test_inductor_options_are_set_by_name_and_an_unknown_one_is_named():
    import torch._inductor.config as cfg

    old = cfg.reorder_for_peak_memory
    try:
        inductor_config([f"reorder_for_peak_memory={not old}"])
        assert cfg.reorder_for_peak_memory is (not old)
    finally:
        cfg.reorder_for_peak_memory = old
    with pytest.raises(SystemExit, match="no_such_option"):
        inductor_config(["no_such_option=1"])
