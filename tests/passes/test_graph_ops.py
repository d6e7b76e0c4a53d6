"""The padding helpers the rewrite inserts: roll left-padded rows to right-padded and back."""
import pytest
import torch

from hysparse_compile.graph import graph_ops


def test_left_pad_shift_counts_leading_pads_per_row():
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]])
    assert graph_ops.left_pad_shift(mask).tolist() == [0, 2, 4, 0]


def test_roll_rows_moves_real_tokens_to_the_front_and_unroll_inverts_it():
    x = torch.randn(3, 2, 7, 5, generator=torch.Generator().manual_seed(0))  # [B, H, T, d]
    shift = torch.tensor([0, 3, 6])
    rolled = graph_ops.roll_rows(x, shift)
    assert torch.equal(rolled[1, :, :4], x[1, :, 3:]) and torch.equal(rolled[2, :, 0], x[2, :, 6])
    assert torch.equal(graph_ops.unroll_rows(rolled, shift), x)


def test_roll_rows_on_the_hidden_state_axis():
    x = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(1))  # [B, T, hidden]
    shift = torch.tensor([1, 2])
    assert torch.equal(graph_ops.roll_rows(x, shift, dim=1)[1, :4], x[1, 2:])


def test_branch_gates_are_half_with_zero_weights_and_split_per_branch():
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(2))
    sparse, swa = graph_ops.branch_gates(x, torch.zeros(2 * 3 * 4, 8), heads=3, branches=2)
    assert sparse.shape == swa.shape == (2, 3, 5, 4) and torch.equal(sparse, torch.full_like(sparse, 0.5))
    w = torch.zeros(2 * 3 * 1, 8)
    w[3:, 0] = 100.0  # only the SWA gates read feature 0
    sparse, swa = graph_ops.branch_gates(x, w, heads=3, branches=2)
    assert sparse.shape == (2, 3, 5, 1) and torch.equal(sparse, torch.full_like(sparse, 0.5))
    assert torch.allclose(swa[..., 0], torch.sigmoid(100 * x[..., 0])[:, None, :].expand(2, 3, 5))


@pytest.mark.parametrize("dynamo_says_exporting", [False, True])
def test_gates_take_gate_sigmoid_under_compile_and_plain_sigmoid_under_export(monkeypatch, dynamo_says_exporting):
    """With grad, torch.compile gets the opaque `gate_sigmoid` (one saved gate tensor per sparse layer) and
    torch.export plain `sigmoid` (what the exporters translate). torch 2.11's Dynamo answers
    `torch.compiler.is_exporting()` with True under any torch.compile (found on the GPU, 2026-12-06: the gates never
    took gate_sigmoid there); `dynamo_says_exporting` makes this torch do the same."""
    from torch._inductor.utils import run_and_get_code

    if dynamo_says_exporting:  # True while Dynamo traces, torch.export's flag elsewhere (torch 2.11)
        monkeypatch.setattr(torch.compiler, "is_exporting",
                            lambda: torch.compiler.is_compiling() or torch.compiler._is_exporting_flag)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, generator=gen, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(2 * 2 * 4, 8, generator=gen))

    def gates(x):
        sparse, swa = graph_ops.branch_gates(x, weight, heads=2, branches=2)
        return sparse + swa

    torch._dynamo.reset()
    _, codes = run_and_get_code(lambda: torch.compile(gates, backend="inductor")(x))
    assert any("gate_sigmoid" in c for c in codes)

    class Gates(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = weight

        def forward(self, x):
            sparse, swa = graph_ops.branch_gates(x, self.weight, heads=2, branches=2)
            return sparse + swa

    for strict in (False, True):
        graph = str(torch.export.export(Gates(), (x,), strict=strict).graph)
        assert "gate_sigmoid" not in graph and "sigmoid" in graph, strict


def test_padding_rolls_run_only_when_a_row_is_padded(monkeypatch):
    from hysparse_compile.graph import graph_ops
    from models import compiled_pair, logits

    _, compiled = compiled_pair("llama-sdpa")
    calls = []
    real = graph_ops._row_index
    monkeypatch.setattr(graph_ops, "_row_index", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    plain = logits(compiled(ids))
    ones = logits(compiled(ids, attention_mask=torch.ones_like(ids)))
    assert not calls and torch.equal(plain, ones)  # no padding: no roll
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    padded = logits(compiled(ids, attention_mask=mask))
    assert calls and torch.allclose(padded[1], plain[1], rtol=1e-5, atol=1e-5)  # rolled; the unpadded row unchanged
