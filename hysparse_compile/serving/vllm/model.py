"""vLLM model classes that serve HySparse checkpoints: the family's own vLLM class, turned HySparse after it is built.

`HySparseLlamaForCausalLM` (and the Qwen2 / Qwen3 ones) subclass vLLM's class for the family. When the served
directory holds a HySparse checkpoint (`hysparse.json` + `schedule.json`, written by `compiled.save_pretrained`), each
decoder layer's vLLM `Attention` is replaced by one on the HYSPARSE backend with the layer's role (roles.py), the
sparse layers get their gate and sink parameters (`model.layers.N.hysparse.gate.weight`, `...hysparse.sinks`, the
checkpoint's names), and the attention module's forward becomes `HySparseAttentionForward.forward`. Without a
HySparse checkpoint the class is the family's own, untouched (the plugin registers it under the family's
architecture name, so plain checkpoints of that family keep serving as before).

Adding a family (docs/serving.md "Adding a family"): a `qkv(attn, positions, hidden_states) -> q, k, v` function
that is the family's attention forward up to its `self.attn(q, k, v)` call, and a two-line class below; then its
architecture name in `plugin.ARCHITECTURES`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from .backend import HySparseAttentionBackend
from .paged import apply_gates
from .roles import LayerRole, ServedCheckpoint, is_checkpoint


# ---------------------------------------------------------------------------------------------- family q/k/v
def llama_qkv(attn, positions, hidden_states):
    """Llama (and Qwen2 without qk_norm): fused projection, split, RoPE. -> q [N, Hq*d], k, v [N, Hkv*d]"""
    qkv, _ = attn.qkv_proj(hidden_states)
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q, k = attn.rotary_emb(positions, q, k)
    return q, k, v


def _head_norm(x, norm, head_dim):
    return norm(x.view(*x.shape[:-1], x.shape[-1] // head_dim, head_dim)).view(x.shape)


def qwen2_qkv(attn, positions, hidden_states):
    """Qwen2: as Llama (biases live in qkv_proj), with per-head q/k RMSNorm before RoPE when `qk_norm`."""
    qkv, _ = attn.qkv_proj(hidden_states)
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    if getattr(attn, "qk_norm", False):
        q, k = _head_norm(q, attn.q_norm, attn.head_dim), _head_norm(k, attn.k_norm, attn.head_dim)
    q, k = attn.rotary_emb(positions, q, k)
    return q, k, v


def qwen3_qkv(attn, positions, hidden_states):
    """Qwen3: per-head q/k RMSNorm, then RoPE."""
    qkv, _ = attn.qkv_proj(hidden_states)
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q, k = _head_norm(q, attn.q_norm, attn.head_dim), _head_norm(k, attn.k_norm, attn.head_dim)
    q, k = attn.rotary_emb(positions, q, k)
    return q, k, v


# ---------------------------------------------------------------------------------------------- new parameters
class HySparseParams(nn.Module):
    """A sparse layer's new weights, named as in the checkpoint: `gate.weight [branches*Hq*e, hidden]` (e = d for
    gate="element", 1 for "head"; no bias) and `sinks [Hq]`."""

    def __init__(self, hidden: int, heads: int, head_dim: int, gate: str, branches: int, sinks: bool):
        super().__init__()
        self.heads, self.branches = heads, branches
        if gate != "none":
            per = head_dim if gate == "element" else 1
            self.gate = nn.Linear(hidden, branches * heads * per, bias=False)
        self.sinks = nn.Parameter(torch.zeros(heads)) if sinks else None

    def gates(self, x: torch.Tensor):
        """Paper §3.3: g~, g' = sigmoid(W x). x [N, hidden] -> (gate_sparse, gate_swa or None), each [N, Hq, e]."""
        if not hasattr(self, "gate"):
            return None, None
        g = torch.sigmoid(F.linear(x, self.gate.weight)).view(x.shape[0], self.branches, self.heads, -1)
        return g[:, 0], (g[:, 1] if self.branches == 2 else None)


class HySparseAttentionForward(nn.Module):
    """The forward a family's attention module gets (by class swap, see `_convert_layer`): the family's q/k/v,
    then the full layer's attention, or the sparse layer's two branches mixed by its gates, then `o_proj`."""

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.hysparse_qkv(self, positions, hidden_states)
        role: LayerRole = self.hysparse_role
        if role.role == "full":
            out = self.attn(q, k, v)
        else:
            n, heads, d = q.shape[0], self.attn.num_heads, self.attn.head_size
            branches = self.attn(q, k, v, output_shape=torch.Size((n, 2 * heads * d))).view(n, 2, heads, d)
            params = self.hysparse_params[0]
            if role.merge or params is None:
                gate_sparse, gate_swa = None, None
            else:
                gate_sparse, gate_swa = params.gates(hidden_states)
            out = (branches[:, 0] if role.merge else apply_gates(branches, gate_sparse, gate_swa)).reshape(n, -1)
        output, _ = self.o_proj(out)
        return output


_FORWARD_CLASSES: dict[type, type] = {}


def _hysparse_class(base: type) -> type:
    if base not in _FORWARD_CLASSES:
        _FORWARD_CLASSES[base] = type(f"HySparse{base.__name__}", (HySparseAttentionForward, base), {})
    return _FORWARD_CLASSES[base]


# ---------------------------------------------------------------------------------------------- conversion
def check_parallel(vllm_config) -> None:
    """Refuse what is not supported yet, naming the setting (docs/serving.md "Limits")."""
    par = vllm_config.parallel_config
    if par.tensor_parallel_size != 1:
        raise ValueError(f"HySparse serving: tensor_parallel_size={par.tensor_parallel_size} is not supported yet "
                         f"(gates, sinks and per-KV-head selections are not sharded); use tensor_parallel_size=1")
    if par.pipeline_parallel_size != 1:
        raise ValueError(f"HySparse serving: pipeline_parallel_size={par.pipeline_parallel_size} is not supported "
                         f"yet (a sparse layer reads its full layer's pages, which must sit on the same rank); use "
                         f"pipeline_parallel_size=1")
    if vllm_config.speculative_config is not None:
        raise ValueError("HySparse serving: speculative decoding (speculative_config) is not supported yet; serve "
                         "without --speculative-config")


def _convert_layer(attn_mod: nn.Module, role: LayerRole, layer_names: dict[int, str], params, qkv, vllm_config):
    old: Attention = attn_mod.attn
    context = vllm_config.compilation_config.static_forward_context
    context.pop(old.layer_name)
    window = role.window if role.cache == "window" else None
    share = layer_names[role.kv_source] if role.cache == "none" else None
    attn_mod.attn = Attention(old.num_heads, old.head_size, old.impl.scale, num_kv_heads=old.num_kv_heads,
                              cache_config=vllm_config.cache_config, per_layer_sliding_window=window,
                              prefix=old.layer_name, kv_sharing_target_layer_name=share,
                              attn_backend=HySparseAttentionBackend, hysparse=role,
                              kv_source_name=layer_names.get(role.kv_source),
                              sinks=None if params is None else params.sinks)
    attn_mod.hysparse_role = role
    attn_mod.hysparse_qkv = qkv
    attn_mod.hysparse_params = [params]  # a list: the parameters are registered on the decoder layer, not here
    attn_mod.__class__ = _hysparse_class(type(attn_mod))


class HySparseMixin:
    """Put first in the bases of a vLLM family class; `hysparse_qkv` is the family's q/k/v function."""

    hysparse_qkv = staticmethod(llama_qkv)

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self.hysparse_checkpoint = None
        model_dir = vllm_config.model_config.model
        if not is_checkpoint(model_dir):
            return
        check_parallel(vllm_config)
        config = vllm_config.model_config.hf_config
        served = ServedCheckpoint.load(model_dir, config.num_hidden_layers)
        self.hysparse_checkpoint = served
        layers = list(self.model.layers)
        names = {i: layer.self_attn.attn.layer_name for i, layer in enumerate(layers)}
        for i, (layer, role) in enumerate(zip(layers, served.roles)):
            spec = served.schedule.layers[i]
            params = None
            if role.role == "sparse" and not role.merge and (spec.gate != "none" or spec.sinks):
                attn = layer.self_attn.attn
                params = HySparseParams(config.hidden_size, attn.num_heads, attn.head_size, spec.gate,
                                        2 if spec.window is not None else 1, spec.sinks)
                layer.hysparse = params
            _convert_layer(layer.self_attn, role, names, params, type(self).hysparse_qkv, vllm_config)

    def load_weights(self, weights):
        if self.hysparse_checkpoint is None:
            return super().load_weights(weights)
        ours: dict[str, torch.Tensor] = {}

        def stock():
            for name, tensor in weights:
                if ".hysparse." in name:
                    ours[name] = tensor
                else:
                    yield name, tensor

        loaded = set(super().load_weights(stock()))
        params = {n: p for n, p in self.named_parameters() if ".hysparse." in n}
        unknown = sorted(set(ours) - set(params))
        missing = sorted(set(params) - set(ours))
        if unknown or missing:
            raise ValueError(f"{self.hysparse_checkpoint.directory}: HySparse weights do not fit the schedule: "
                             f"unexpected {unknown[:4]}, missing {missing[:4]}")
        for name, tensor in ours.items():
            param = params[name]
            if tuple(param.shape) != tuple(tensor.shape):
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)}, model expects {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(tensor.to(param.dtype))
            loaded.add(name)
        return loaded


class HySparseLlamaForCausalLM(HySparseMixin, LlamaForCausalLM):
    hysparse_qkv = staticmethod(llama_qkv)


class HySparseQwen2ForCausalLM(HySparseMixin, Qwen2ForCausalLM):
    hysparse_qkv = staticmethod(qwen2_qkv)


class HySparseQwen3ForCausalLM(HySparseMixin, Qwen3ForCausalLM):
    hysparse_qkv = staticmethod(qwen3_qkv)


__all__ = ["HySparseLlamaForCausalLM", "HySparseQwen2ForCausalLM", "HySparseQwen3ForCausalLM", "HySparseMixin",
           "HySparseParams", "llama_qkv", "qwen2_qkv", "qwen3_qkv", "check_parallel"]
