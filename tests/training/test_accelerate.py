"""accelerate on compiled models: `Accelerator().prepare(compiled, optimizer, dataloader)` trains as a plain loop
does, and bf16 mixed precision (autocast on CPU) trains with the HySparse ops in bfloat16, as SDPA would run."""
import pytest
import torch
from training_setup import TokenDataset, compiled_llama, token_rows

import models

accelerate = pytest.importorskip("accelerate")


def _loader():
    return torch.utils.data.DataLoader(TokenDataset(8), batch_size=4)


def _train(model, optimizer, loader, accelerator=None):
    losses = []
    for batch in loader:
        if accelerator is None:
            loss = model(**batch).loss
            loss.backward()
        else:
            with accelerator.autocast():
                loss = model(**batch).loss
            accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach().float())
    return torch.stack(losses)


def test_prepare_trains_like_a_plain_loop():
    plain = compiled_llama()
    plain_losses = _train(plain, torch.optim.AdamW(plain.parameters(), lr=3e-3), _loader())
    compiled = compiled_llama()
    acc = accelerate.Accelerator(cpu=True)
    model, optimizer, loader = acc.prepare(compiled, torch.optim.AdamW(compiled.parameters(), lr=3e-3), _loader())
    assert acc.unwrap_model(model) is compiled
    losses = _train(model, optimizer, loader, acc)
    torch.testing.assert_close(losses, plain_losses, rtol=1e-6, atol=1e-6)
    for name, p in compiled.named_parameters():
        torch.testing.assert_close(p, plain.get_parameter(name), rtol=1e-6, atol=1e-7, msg=name)


def test_bf16_autocast_runs_the_hysparse_ops_in_bfloat16_like_the_original():
    model, compiled = models.compiled_pair("llama-sdpa")  # training-free with every block selected: exact in fp32
    ids = token_rows(4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = compiled(ids, labels=ids), model(ids, labels=ids)
    assert ours.logits.dtype == torch.bfloat16
    # measured: logits differ by 4e-3 (max |logit| 0.65: one bf16 step), losses by 7e-7 relative
    torch.testing.assert_close(ours.logits.float(), theirs.logits.float(), rtol=0, atol=2e-2)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-3, atol=0)


def test_bf16_mixed_precision_trains_with_accelerate():
    compiled = compiled_llama()
    ids = token_rows(4)
    with torch.no_grad():
        fp32_loss = compiled(ids, labels=ids).loss
    acc = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
    model, optimizer, loader = acc.prepare(compiled, torch.optim.AdamW(compiled.parameters(), lr=3e-3), _loader())
    with torch.no_grad(), acc.autocast():
        bf16_loss = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(bf16_loss.float(), fp32_loss, rtol=1e-3, atol=0)  # measured 1.2e-5 relative
    before = {n: p.detach().clone() for n, p in compiled.named_parameters()}
    losses = _train(model, optimizer, loader, acc)
    assert torch.isfinite(losses).all()
    assert all(p.dtype == torch.float32 for p in compiled.parameters())  # autocast: fp32 weights, bf16 compute
    moved = [n for n, p in compiled.named_parameters() if not torch.equal(p, before[n])]
    assert any(".hysparse.gate." in n for n in moved) and any("q_proj" in n for n in moved)
