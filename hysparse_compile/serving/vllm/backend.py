"""The HYSPARSE attention backend for vLLM: one backend for both layer kinds, so both read pages it laid out itself.

Page layout (ours): each layer's cache is vLLM's logical `[num_pages, Hkv, page, 2 * d]` view (any strides, whatever
KV cache layout vLLM resolved); `[..., :d]` is K and `[..., d:]` is V. K/V are written by `do_kv_cache_update`
(vLLM calls it before the attention op, at the layer's slot mapping).

- full layer: `paged_full_attention` over its pages; the selected blocks of this step's tokens go to
  `impl.indices [max_tokens, Hkv, nsel]`, a buffer the sparse layers after it read in the same forward (the full
  layer always runs first: the sparse layers' queries depend on its output).
- sparse layer: `paged_sparse_attention` reading the full layer's pages and block table (found by layer name in
  vLLM's forward context) at the selected blocks, and its own window pages; writes both branches ungated
  (`[N, 2, Hq, d]`); the model applies the gates (`model.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.forward_context import get_forward_context
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)

from . import ops, paged
from .roles import LayerRole

NAME = "HYSPARSE"


@dataclass
class HySparseMetadata:
    """Per-step, per-KV-cache-group metadata (shapes: R requests, N tokens)."""

    num_actual_tokens: int
    query_start_loc: torch.Tensor  # int32 [R + 1]
    seq_lens: torch.Tensor  # int32 [R]: context length including this step's tokens
    block_table: torch.Tensor  # int32 [R, max_pages]: this group's pages
    slot_mapping: torch.Tensor  # int64 [N]
    max_query_len: int
    max_seq_len: int


class HySparseMetadataBuilder(AttentionMetadataBuilder[HySparseMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER
    reorder_batch_threshold = None  # prefill pieces and decode tokens in any order

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> HySparseMetadata:
        m = common_attn_metadata
        return HySparseMetadata(num_actual_tokens=m.num_actual_tokens, query_start_loc=m.query_start_loc,
                                seq_lens=m.seq_lens, block_table=m.block_table_tensor, slot_mapping=m.slot_mapping,
                                max_query_len=m.max_query_len, max_seq_len=m.max_seq_len)


class HySparseAttentionBackend(AttentionBackend):
    """Full and sparse HySparse layers over paged caches (PyTorch path on CPU, Triton kernels on CUDA)."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16", "float32"]

    @staticmethod
    def get_name() -> str:
        return NAME

    @staticmethod
    def get_impl_cls():
        return HySparseAttentionImpl

    @staticmethod
    def get_builder_cls():
        return HySparseMetadataBuilder

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_sink(cls) -> bool:
        return True


def split_kv(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's `[num_pages, Hkv, page, 2d]` layer view -> (K, V) views `[num_pages, Hkv, page, d]`."""
    return kv_cache[..., :head_size], kv_cache[..., head_size:]


class HySparseAttentionImpl(AttentionImpl[HySparseMetadata]):
    """One layer's attention; what it does is its `LayerRole` (roles.py), passed by the model as `hysparse=`."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads=None, alibi_slopes=None, sliding_window=None,
                 kv_cache_dtype="auto", logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, *, hysparse: LayerRole, kv_source_name: str | None = None,
                 sinks: torch.Tensor | None = None):
        reasons = []
        if alibi_slopes is not None:
            reasons.append("alibi_slopes (ALiBi) is not supported")
        if logits_soft_cap:
            reasons.append(f"logits_soft_cap={logits_soft_cap} is not supported")
        if attn_type != AttentionType.DECODER:
            reasons.append(f"attn_type={attn_type!r}: only decoder attention is supported")
        if kv_cache_dtype not in HySparseAttentionBackend.supported_kv_cache_dtypes:
            reasons.append(f"kv_cache_dtype={kv_cache_dtype!r}: valid are "
                           f"{', '.join(HySparseAttentionBackend.supported_kv_cache_dtypes)} (fp8 caches are planned)")
        if reasons:
            raise ValueError(f"HySparse attention, layer {hysparse.index}: " + "; ".join(reasons))
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.sliding_window = sliding_window
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.role = hysparse
        self.kv_source_name = kv_source_name  # vLLM layer name of the full layer a sparse layer reads
        self.sinks = sinks
        self.indices = torch.empty(0, self.num_kv_heads, max(hysparse.nsel, 1), dtype=torch.int32)

    # ------------------------------------------------------------------ cache write
    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        k_cache, v_cache = split_kv(kv_cache, self.head_size)
        paged.write_kv(key, value, k_cache, v_cache, slot_mapping)

    # ------------------------------------------------------------------ attention
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("HySparse attention: fused output quantization is not supported")
        if attn_metadata is None:  # profiling / warm-up run: no cache bound yet
            return output
        n = attn_metadata.num_actual_tokens
        if self.role.role == "full":
            return self._full(query[:n], kv_cache, attn_metadata, output, n)
        return self._sparse(query[:n], kv_cache, attn_metadata, output, n)

    def _full(self, q, kv_cache, md: HySparseMetadata, output, n):
        k_cache, v_cache = split_kv(kv_cache, self.head_size)
        out, indices = ops.paged_full_attention(q, k_cache, v_cache, md.block_table, md.query_start_loc,
                                                md.seq_lens, self.role.block_size, self.role.nsel, self.scale)
        output[:n] = out.to(output.dtype)
        if self.indices.shape[0] < n or self.indices.device != indices.device:
            self.indices = torch.empty((max(n, 2 * self.indices.shape[0]),) + tuple(indices.shape[1:]),
                                       dtype=torch.int32, device=indices.device)
        self.indices[:n] = indices
        return output

    def _sparse(self, q, kv_cache, md: HySparseMetadata, output, n):
        role = self.role
        ctx = get_forward_context()
        source = ctx.no_compile_layers[self.kv_source_name]
        metadata = ctx.attn_metadata
        if isinstance(metadata, list):
            metadata = metadata[0]
        source_md: HySparseMetadata = metadata[self.kv_source_name]
        own_k, own_v = split_kv(kv_cache, self.head_size)
        src_k, src_v = split_kv(source.kv_cache, self.head_size)
        by_name = {"source": (src_k, src_v, source_md.block_table), "own": (own_k, own_v, md.block_table)}
        k_sh, v_sh, sh_table = by_name[role.shared]
        k_w, v_w, w_table = by_name[role.win] if role.win != "none" else (k_sh, v_sh, sh_table)
        indices = source.impl.indices[:n]
        branches = ops.paged_sparse_attention(q, k_sh, v_sh, sh_table, k_w, v_w, w_table, indices,
                                              md.query_start_loc, md.seq_lens, self.sinks, role.block_size,
                                              role.window, self.scale, role.merge)
        output.view(-1, 2, self.num_heads, self.head_size)[:n] = branches.to(output.dtype)
        return output


__all__ = ["HySparseAttentionBackend", "HySparseAttentionImpl", "HySparseMetadata", "HySparseMetadataBuilder",
           "NAME", "split_kv"]
