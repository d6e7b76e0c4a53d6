"""What training tools read from a model, on every compiled model: gradient checkpointing switches, the embedding
accessors, `num_parameters`, and the loss keyword arguments `Trainer` passes.

    >>> compiled = hs.compile(model, schedule)
    >>> compiled.gradient_checkpointing_enable()        # checkpointing.py: one region per decoder layer
    >>> compiled.is_gradient_checkpointing
    True
    >>> compiled.get_input_embeddings().weight is model.get_input_embeddings().weight   # shared, not copied
    True
    >>> compiled.num_parameters(exclude_embeddings=True)
    >>> compiled(input_ids=ids, labels=ids, num_items_in_batch=n).loss   # summed token losses / n, as HF computes it

`TrainingSupport` is a base of `HySparseModel`, ahead of `PreTrainedModel` for HF models (runtime/hf.py), so these
are what `Trainer` (including `TrainingArguments(gradient_checkpointing=True)`), accelerate and PEFT call.
"""
from __future__ import annotations

import torch.nn as nn

from . import checkpointing

# keyword arguments of HF loss functions (`ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch=None,
# ignore_index=-100, shift_labels=None)`) that Trainer and users pass through the model's forward
LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


def module_path(model: nn.Module, module) -> str | None:
    """The path of `module` inside `model` (None when it is not a submodule)."""
    if module is None:
        return None
    return next((name for name, m in model.named_modules() if m is module), None)


def embedding_paths(model: nn.Module, gm, token: str) -> tuple[str | None, str | None, tuple[str, ...]]:
    """(input embeddings, output embeddings, every nn.Embedding) of the model given to compile, as module paths.
    HF and PEFT models answer through their own `get_input_embeddings` / `get_output_embeddings`; other models
    through the graph: the module whose weight the token ids index, and the one whose weight makes the output."""
    every = tuple(name for name, m in model.named_modules() if isinstance(m, nn.Embedding))
    try:
        inp = module_path(model, model.get_input_embeddings()) if hasattr(model, "get_input_embeddings") else None
    except NotImplementedError:
        inp = None
    try:
        out = module_path(model, model.get_output_embeddings()) if hasattr(model, "get_output_embeddings") else None
    except NotImplementedError:
        out = None
    if inp is None:
        inp = _graph_input_embedding(gm, token)
    if out is None and not hasattr(model, "get_output_embeddings"):
        out = _graph_output_projection(gm)
    return inp, out, every


def _owner(node) -> str | None:
    if getattr(node, "op", None) == "get_attr" and "." in node.target:
        return node.target.rsplit(".", 1)[0]
    return None


def _graph_input_embedding(gm, token: str) -> str | None:
    import torch

    for node in gm.graph.nodes:
        if (node.op == "call_function" and node.target is torch.ops.aten.embedding.default
                and getattr(node.args[1], "op", None) == "placeholder" and node.args[1].name == token):
            return _owner(node.args[0])
    return None


def _graph_output_projection(gm) -> str | None:
    """The module whose weight the (first) graph output is a linear projection by, through layout ops."""
    import torch

    aten = torch.ops.aten
    layout = {aten.view.default, aten.reshape.default, aten.slice.Tensor, aten.transpose.int, aten.contiguous.default,
              aten._to_copy.default, aten.to.dtype, aten.clone.default, aten.alias.default}
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    while isinstance(out, (tuple, list)) and out:
        out = out[0]
    node = out
    while getattr(node, "op", None) == "call_function" and node.target in layout:
        node = node.args[0]
    if getattr(node, "op", None) == "call_function" and node.target is aten.linear.default:
        return _owner(node.args[1])
    return None


class TrainingSupport:
    """Training-tool methods of `HySparseModel` (a mixin: it holds no state of its own beyond `_gc`)."""

    # ------------------------------------------------------------------------------------ gradient checkpointing
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, every_n_layers: int = 1,
                                      offload: bool = False) -> None:
        """Checkpoint each decoder layer's region of the compiled graph in training (checkpointing.py).

        gradient_checkpointing_kwargs: passed to `torch.utils.checkpoint.checkpoint` (`use_reentrant` must be False
        or absent; e.g. `{"preserve_rng_state": False}`). every_n_layers: checkpoint layers 0, n, 2n, ... only.
        offload: keep the layers' saved inputs in host memory. Takes effect at the next forward in `.train()` mode
        with autograd recording; `.eval()`, `torch.no_grad()` and cached (generate) calls run the plain graph.

            >>> compiled.gradient_checkpointing_enable({"preserve_rng_state": False})
        """
        settings = checkpointing.settings_from(gradient_checkpointing_kwargs, every_n_layers, offload)
        object.__setattr__(self, "_gc", settings)
        object.__setattr__(self, "_checkpointed", None)

    def gradient_checkpointing_disable(self) -> None:
        """Run the plain graph again (the activations of every layer are kept for the backward)."""
        object.__setattr__(self, "_gc", None)
        object.__setattr__(self, "_checkpointed", None)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.__dict__.get("_gc") is not None

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload: bool = False) -> None:
        """transformers >= 5.2x's name for `gradient_checkpointing_enable` (what `Trainer` calls)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)

    def activation_checkpointing_disable(self) -> None:
        self.gradient_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.is_gradient_checkpointing

    def enable_input_require_grads(self) -> None:
        """HF and PEFT call this before checkpointing a model with frozen embeddings, so that a *reentrant*
        checkpoint back-propagates into the layers. The compiled model's layers are checkpointed non-reentrantly,
        which reaches every parameter a layer reads (LoRA weights included) whatever its inputs: nothing to do."""

    def disable_input_require_grads(self) -> None:
        """See `enable_input_require_grads`: nothing was changed, nothing to undo."""

    # ------------------------------------------------------------------------------------------------ embeddings
    def get_input_embeddings(self) -> nn.Module | None:
        """The module holding the token embedding weight (the original model's parameter, shared), or None."""
        path = self._embeddings[0]
        return self.get_submodule(path) if path else None

    def get_output_embeddings(self) -> nn.Module | None:
        """The module holding the output projection weight (HF: `lm_head`), or None when the model has none."""
        path = self._embeddings[1]
        return self.get_submodule(path) if path else None

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters of the compiled model (original weights, shared, plus the new gates and sinks); tied tensors
        count once. only_trainable: those with `requires_grad`; exclude_embeddings: without the weights of the
        original's `nn.Embedding` modules (as `PreTrainedModel.num_parameters`)."""
        skip = {f"{path}.weight" for path in self._embeddings[2]} if exclude_embeddings else set()
        return sum(p.numel() for name, p in self.named_parameters()
                   if name not in skip and (p.requires_grad or not only_trainable))

    @property
    def accepts_loss_kwargs(self) -> bool:
        """True when labels give a loss (the original has a loss function): `Trainer` then passes
        `num_items_in_batch`, and the loss is the summed token loss divided by it, as in the original."""
        return self.__dict__.get("_loss_function") is not None
