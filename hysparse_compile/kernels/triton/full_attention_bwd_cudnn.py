"""The full layer's backward through cuDNN's fused attention backward (issue #22 item 3's backward).

The full layer's output is plain causal attention (the selection is not differentiated), so its gradients are
SDPA's. cuDNN's SDPA backward needs only what this project's forward already keeps: `out` and the row log-sum-exp
(natural log, `[B, Hq, T]`, the keys' own). With sinks, the sink joins each row's denominator, so cuDNN is given
`logaddexp(lse, sink)` (folded in by `full_attention.full_attention_bwd` for both engines) and computes the keys'
probabilities and `delta = rowsum(dO * O)` exactly as the sink-inclusive softmax has them (a sink carries no value,
so `dP_sink = 0` and the usual `dS = P * (dP - delta)` holds); the sinks' own gradient is the op's
(`ops.sink_gradient`). GQA: cuDNN takes K/V with their own head count and returns dK/dV summed over each group.

Engines (`ENGINE`, forced with `backward_engine`): "auto" runs cuDNN where `cudnn_unsupported` finds no reason
against it, and the Triton FA2 backward (`full_attention.full_attention_bwd`) otherwise and under
`torch.use_deterministic_algorithms(True)` (cuDNN's backward is not deterministic; the Triton one is); "cudnn"
raises where cuDNN cannot run; "triton" always runs the Triton kernels. cuDNN does not support soft-capping or fp32
(our fp32 path computes without TF32); it is used at the head dims checked on a GPU (64, 128), and should it raise
for a configuration under "auto", the Triton kernels take that (device, dtype, head dim) from then on. On the H100
it is faster than the Triton backward at every size measured (docs/kernels_full.md, "Backward").

Called from inside the custom op `hysparse::full_attention_backward`, so `torch.compile` and autograd see one opaque
node as before; the aten op takes `None` for the tensors the dense (non-nested) path does not read.
"""
from __future__ import annotations

import contextlib
import warnings

import torch

ENGINE = "auto"
ENGINES = ("auto", "cudnn", "triton")
CHECKED_HEAD_DIMS = (64, 128)  # checked against the reference on the H100 (bench/full_bwd_engines.py, 2026-12-05)
_FAILED: dict = {}  # (device, dtype, head_dim) -> the error cuDNN raised under "auto": the Triton kernels run there
_SEEDS: dict = {}  # per device: the (unused, dropout 0) philox seed and offset tensors the op's signature asks for


@contextlib.contextmanager
def backward_engine(engine: str):
    """Within the block the full layer's Triton-backend backward runs `engine` ("auto", "cudnn" or "triton"). For
    tests and benchmarks; not thread-safe."""
    global ENGINE
    if engine not in ENGINES:
        raise ValueError(f"backward_engine: engine={engine!r}; valid: {', '.join(map(repr, ENGINES))}")
    old, ENGINE = ENGINE, engine
    try:
        yield
    finally:
        ENGINE = old


def cudnn_unsupported(q: torch.Tensor, softcap: float) -> str | None:
    """Why cuDNN's SDPA backward cannot compute this layer's gradients, or None."""
    if q.device.type != "cuda":
        return f"device {q.device.type!r} (cuDNN attention runs on CUDA)"
    if not torch.backends.cudnn.is_available() or not torch.backends.cudnn.enabled:
        return "cuDNN is not available or is disabled (torch.backends.cudnn)"
    if torch.backends.cudnn.version() < 90000:
        return f"cuDNN {torch.backends.cudnn.version()} (its fused attention backward needs 9.0 or newer)"
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return f"compute capability {torch.cuda.get_device_capability(q.device)} (cuDNN attention needs 8.0+)"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (cuDNN attention takes float16 and bfloat16)"
    if q.shape[-1] not in CHECKED_HEAD_DIMS:
        return (f"head_dim {q.shape[-1]} (the cuDNN backward is used at the head dims checked on a GPU: "
                f"{', '.join(map(str, CHECKED_HEAD_DIMS))})")
    if softcap:
        return f"softcap={softcap} (cuDNN attention has no soft-capping)"
    return None


def use_cudnn(q: torch.Tensor, softcap: float) -> bool:
    """Whether the backward runs on cuDNN under the current `ENGINE` (raises for "cudnn" where it cannot)."""
    if ENGINE == "triton" or (ENGINE == "auto" and torch.are_deterministic_algorithms_enabled()):
        return False  # cuDNN's backward is not deterministic; the Triton kernels are (no atomics)
    reason = cudnn_unsupported(q, softcap) or (_FAILED.get(_key(q)) if ENGINE == "auto" else None)
    if ENGINE == "cudnn" and reason:
        raise ValueError(f"backward_engine('cudnn'): cannot run here: {reason}")
    return reason is None


def _key(q):
    return (q.device, q.dtype, q.shape[-1])


def full_attention_bwd_auto(dout, q, k, v, out, lse, scale, *, triton_bwd):
    """cuDNN's backward; under "auto", if cuDNN raises (a configuration this cuDNN build refuses), the Triton
    backward `triton_bwd` instead, and from then on for this device, dtype and head dim (warned once)."""
    try:
        return full_attention_bwd_cudnn(dout, q, k, v, out, lse, scale)
    except RuntimeError as e:
        if ENGINE != "auto":
            raise
        _FAILED[_key(q)] = f"cuDNN raised {type(e).__name__}: {str(e)[:200]}"
        warnings.warn(f"hysparse: cuDNN's attention backward failed ({_FAILED[_key(q)]}); the full layer's backward "
                      f"runs the Triton kernels for {q.dtype}, head_dim {q.shape[-1]} on {q.device} from now on")
        return triton_bwd()


def _seeds(device):
    if device not in _SEEDS:
        _SEEDS[device] = (torch.zeros(1, dtype=torch.int64, device=device),
                          torch.zeros(1, dtype=torch.int64, device=device))
    return _SEEDS[device]


def full_attention_bwd_cudnn(dout, q, k, v, out, lse, scale):
    """dq, dk, dv of causal attention through cuDNN. dout/q/out [B, Hq, T, d], k/v [B, Hkv, T, d] (any strides
    with unit last stride), lse float32 [B, Hq, T]: natural log of each row's whole denominator (with sinks,
    `logaddexp(keys' lse, sink)`, which `full_attention.full_attention_bwd` folds in)."""
    stats = lse.float().contiguous().unsqueeze(-1)  # [B, Hq, T, 1], the layout cuDNN's forward writes its stats in
    q, k, v, out = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, out))
    if dout.stride() != out.stride():  # cuDNN reads dO in O's layout
        dout = torch.empty_like(out).copy_(dout)
    T_q, T_k = q.shape[2], k.shape[2]
    seed, offset = _seeds(q.device)
    dq, dk, dv = _aten_cudnn_backward(dout, q, k, v, out, stats, seed, offset, None, None, None, T_q, T_k, 0.0, True,
                                      scale=scale)
    return dq, dk, dv


def _aten_cudnn_backward(*args, **kwargs):
    """The aten op (one name, so the CPU tests can stand a float64 model of it in)."""
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(*args, **kwargs)
