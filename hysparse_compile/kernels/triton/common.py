"""Constants and small `@triton.jit` helpers every HySparse kernel shares: the log2 units the kernels compute in,
the interpreter switch, and logit soft-capping.

Every kernel scales its logits by `scale * LOG2E` so that `exp2` gives `exp`. Soft-capping (`softcap * tanh(logit /
softcap)`, Gemma 2) is a constexpr branch (`SOFTCAP`): a kernel launched without it compiles exactly the arithmetic
it had before the option existed. In log2 units the cap is `softcap2 = softcap * LOG2E`:
`LOG2E * softcap * tanh(x / softcap) = softcap2 * tanh(LOG2E * x / softcap2)`.
"""
import warnings

import torch
import triton
import triton.language as tl

from ..interpret import triton_interpret

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # a Triton without host-side tensor descriptors: pointer loads only
    TensorDescriptor = None

LOG2E = 1.4426950408889634  # logits are scaled by scale * LOG2E so that exp2 gives exp
LN2 = 0.6931471805599453
LOG2E_C = tl.constexpr(LOG2E)  # globals used inside kernels must be constexpr
LN2_C = tl.constexpr(LN2)
INTERPRET = triton_interpret()  # at import: kernels are defined once, for the interpreter or for the GPU


def direct(kernel):
    """The launchers' default `wrap`: launch the kernel as it is (a `triton_op` passes `torch.library.wrap_triton`)."""
    return kernel


def softcap2(softcap: float) -> float:
    """The cap in the kernels' log2 units (0.0: no capping)."""
    return float(softcap) * LOG2E if softcap else 0.0


@triton.jit
def tanh(x):
    """tanh(x) from exp2, exact for large |x| (no overflow): sign(x) * (1 - e) / (1 + e), e = exp(-2|x|)."""
    e = tl.exp2(tl.abs(x) * (-2.0 * LOG2E_C))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def soft_cap(s, cap2, SOFTCAP: tl.constexpr):
    """Logits `s` in log2 units, capped to `cap2 * tanh(s / cap2)` when SOFTCAP (mask after capping: the cap of
    -inf is -cap2)."""
    if SOFTCAP:
        s = cap2 * tanh(s / cap2)
    return s


@triton.jit
def soft_cap_with_slope(s, cap2):
    """(capped logits, d capped / d s = 1 - tanh^2) of raw log2-unit logits `s`: a backward multiplies the gradient
    of the capped logits by the slope."""
    t = tanh(s / cap2)
    return cap2 * t, 1.0 - t * t


def tma_ok(*xs):
    """Whether tensor descriptors (Hopper's bulk copies) can address these tensors: a Triton that has them, a CUDA
    device of compute capability 9 or more (or the interpreter), unit last stride, a 16-byte-aligned base, 16-byte
    multiples for the other strides and no broadcast (stride 0) dimension."""
    if TensorDescriptor is None:
        return False
    for x in xs:
        if not INTERPRET and (x.device.type != "cuda" or torch.cuda.get_device_capability(x.device)[0] < 9):
            return False
        es = x.element_size()
        if x.stride(-1) != 1 or x.data_ptr() % 16:
            return False
        if any((st * es) % 16 or (st == 0 and n > 1) for st, n in zip(x.stride()[:-1], x.shape[:-1])):
            return False
    return True


def capturing(x) -> bool:
    """Whether a CUDA graph is being captured on x's device's current stream (no host sync may happen)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def timed_at(pairs, block_size, head_dim) -> bool:
    """Whether a kernel default tuned on a GPU applies at (block_size, head_dim): `pairs` are the (block_size,
    head_dim) pairs where it was timed (None: everywhere)."""
    return pairs is None or (block_size, head_dim) in pairs


def with_descriptors(failed, key, what, mode, launch):
    """`launch(mode)`: the kernel with tensor-descriptor loads in TMA mode `mode` (`tma_mode`), unless mode is 0 or
    it failed before for `key + (mode,)`; if it raises (out of memory excepted), the reason is kept in
    `failed[key + (mode,)]`, a warning says so once, and `launch(0)` (pointer loads) runs, now and from then on."""
    key = key + (mode,)
    if mode and key not in failed:
        try:
            return launch(mode)
        except Exception as e:  # noqa: BLE001 - a Triton or driver that cannot build the descriptor kernel
            if isinstance(e, torch.OutOfMemoryError):
                raise
            failed[key] = f"{type(e).__name__}: {str(e)[:200]}"
            warnings.warn(f"hysparse: {what} with tensor descriptors failed ({failed[key]}); it uses pointer loads "
                          f"on {key} from now on", RuntimeWarning, stacklevel=3)
    return launch(0)


def tma_mode(want, *xs):
    """The kernels' TMA mode for a "tma" option (False, True / "4d", "2d") and K/V tensors [B, Hkv, S, d]: 0
    (pointer loads: not wanted, or the bulk copy cannot address them), 1 (4-D descriptors, any strides), 2 or 3
    (2-D descriptors: every tensor contiguous, or every one in the model's [B, S, Hkv, d] layout; else 1)."""
    if not want or not tma_ok(*xs):
        return 0
    if want == "2d":
        if all(x.is_contiguous() for x in xs):
            return 2
        if all(x.transpose(1, 2).is_contiguous() for x in xs):
            return 3
    return 1


def descriptor(x, mode, block_n):
    """The tensor descriptor of K or V [B, Hkv, S, d] for TMA mode 1 ([B, Hkv, S, d], block [1, 1, block_n, d]), 2
    (contiguous, seen as [B * Hkv * S, d]) or 3 (the model's layout, seen as [B * S, Hkv * d]); 2-D blocks
    [block_n, d]. In modes 2 and 3 a block past a head's last row reads the next head's or batch row's keys."""
    B, H, S, d = x.shape
    if mode == 2:
        return TensorDescriptor(x, [B * H * S, d], [d, 1], [block_n, d])
    if mode == 3:
        return TensorDescriptor(x, [B * S, H * d], [H * d, 1], [block_n, d])
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, block_n, d])
