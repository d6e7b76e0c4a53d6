"""Online-softmax pieces shared by the sparse-layer kernels (log2 domain; inlined by Triton)."""
import triton
import triton.language as tl


@triton.jit
def online_softmax_step(s, v, m, l, acc):
    """Fold one key tile into the running (max, sum, acc).

    s [ROWS, N] masked logits in log2 units (-inf = not visible), v [N, D]; m, l [ROWS], acc [ROWS, D] float32.
    Rows that have seen no key yet keep m = -inf and l = 0.
    """
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l, acc


@triton.jit
def normalize_with_sink(m, l, acc, sink2):
    """acc / (sum of exp over keys + exp(sink)), all in log2 units; sink2 = -inf means no sink. -> [ROWS, D]"""
    top = tl.maximum(m, sink2)
    top = tl.where(top == float("-inf"), 0.0, top)
    den = l * tl.exp2(m - top) + tl.exp2(sink2 - top)
    den = tl.where(den == 0.0, 1.0, den)
    return acc * (tl.exp2(m - top) / den)[:, None]
