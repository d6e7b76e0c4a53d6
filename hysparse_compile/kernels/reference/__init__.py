"""The reference backend: plain PyTorch on any device, the ground truth every kernel is tested against."""
from .full_attention import full_attention_bwd, full_attention_decode, full_attention_fwd, query_chunk_elems
from .select_blocks import select_blocks
from .sparse_attention import sparse_attention_bwd, sparse_attention_decode, sparse_attention_fwd

NAME = "reference"


def supports(op: str, **meta) -> str | None:
    """The reference runs every case on every device."""
    return None


__all__ = [
    "full_attention_fwd", "full_attention_bwd", "full_attention_decode",
    "sparse_attention_fwd", "sparse_attention_bwd", "sparse_attention_decode",
    "select_blocks", "supports", "query_chunk_elems",
]
