"""The reference backend: the naive math (`kernels/naive`) in query chunks, plain PyTorch on any device; the backward
is autograd through the same math. Every case runs here (`supports` never refuses)."""
from .chunks import query_chunk_elems, query_chunks
from .full_attention import full_attention_bwd, full_attention_decode, full_attention_extend, full_attention_fwd
from .sparse_attention import (sparse_attention_bwd, sparse_attention_decode, sparse_attention_extend,
                               sparse_attention_fwd)

NAME = "reference"


def supports(op: str, **meta) -> str | None:
    """The reference runs every op, every case, on every device."""
    return None


__all__ = [
    "full_attention_fwd", "full_attention_bwd", "full_attention_decode", "full_attention_extend",
    "sparse_attention_fwd", "sparse_attention_bwd", "sparse_attention_decode", "sparse_attention_extend",
    "supports", "query_chunk_elems", "query_chunks", "NAME",
]
