"""Shared pieces of the training-tool tests: one compiled tiny Llama (compiling is the slow part; each test gets a
deep copy) and a token dataset."""
import copy
import functools

import torch

import models

SEQ, ROWS = 40, 16
SCHEDULE = dict(block_size=16, topk=32, window=16)  # topk < SEQ: the sparse layers select


@functools.lru_cache(maxsize=None)
def _pristine(pattern: str):
    import transformers

    import hysparse_compile as hs

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**models._hf_common(len(pattern), 4, 2), "tie_word_embeddings": True})
    model = transformers.LlamaForCausalLM(config).eval()  # tied embeddings, as most small checkpoints have
    return hs.compile(model, hs.Schedule.from_pattern(pattern, **SCHEDULE), gate_init=0.01, sink_init=0.1)


def compiled_llama(pattern: str = "FSSS"):
    """A fresh copy of a compiled HF Llama with tied embeddings (paper mode: gates and sinks), in train mode."""
    return copy.deepcopy(_pristine(pattern)).train()


def token_rows(n: int = ROWS, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, models.VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


class TokenDataset(torch.utils.data.Dataset):
    """Causal-LM rows: input_ids and labels (the model shifts them)."""

    def __init__(self, n: int = ROWS, seed: int = 0):
        self.rows = token_rows(n, seed)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}
