"""Activation checkpointing of the denoiser (engine/activation_checkpointing.py): the same loss
and the same gradients as the plain step, on a tiny Llama and a tiny Nemotron-H (Mamba,
attention, MoE), with documents and time conditioning; and proof the recompute happened
and that it needs the tower's run re-entered."""

import copy

import pytest
import torch
from tiny_models import tiny_backbone

from twotower_train.engine import activation_checkpointing as ac
from twotower_train.model import TwoTowerModel

VOCAB, MASK, BS, L = 128, 127, 4, 16

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["llama", "nemotron_h"])
def model(request):
    backbone = tiny_backbone(request.param)
    return TwoTowerModel.from_backbone(
        backbone, mask_token_id=MASK, block_size=BS, time_conditioning=True
    ).train()


def _inputs():
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(3, VOCAB - 1, (2, L), generator=g)
    noisy = torch.where(torch.rand(clean.shape, generator=g) < 0.5, MASK, clean)
    doc_ids = torch.zeros_like(clean)
    doc_ids[0, 7:] = 1  # a document boundary inside block 1 of row 0
    t = torch.rand(2, L // BS, generator=g)
    targets = torch.randint(0, VOCAB, clean.shape, generator=g)
    return clean, noisy, doc_ids, t, targets


def _step(model):
    """Loss and gradients of one denoiser forward + backward (CE at every position)."""
    clean, noisy, doc_ids, t, targets = _inputs()
    model.zero_grad(set_to_none=True)
    logits = model(clean, noisy, t=t, doc_ids=doc_ids)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _count_layer_calls(model):
    calls = []
    for layer in model.denoiser.layers:
        inner = layer.forward

        def counted(*args, _inner=inner, **kwargs):
            calls.append(1)
            return _inner(*args, **kwargs)

        layer.forward = counted
    return calls


def test_checkpointed_step_equals_plain_step(model):
    plain = copy.deepcopy(model)
    ckpt = copy.deepcopy(model)
    calls = _count_layer_calls(ckpt)  # under the checkpoint: counts forward + recompute
    assert ac.checkpoint_trained_tower(ckpt) == len(ckpt.denoiser.layers)
    loss0, grads0 = _step(plain)
    loss1, grads1 = _step(ckpt)
    assert len(calls) == 2 * len(ckpt.denoiser.layers), "every layer recomputed once"
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys() and len(grads0) > 10
    assert all(not k.startswith("context.") for k in grads0)
    for k in grads0:
        torch.testing.assert_close(grads1[k], grads0[k], rtol=1e-5, atol=1e-7, msg=k)
    with torch.no_grad():  # no autograd: the layers run plainly
        calls.clear()
        clean, noisy, doc_ids, t, _ = _inputs()
        torch.testing.assert_close(
            ckpt(clean, noisy, t=t, doc_ids=doc_ids), plain(clean, noisy, t=t, doc_ids=doc_ids)
        )
        assert len(calls) == len(ckpt.denoiser.layers)


def test_a_deep_copy_checkpoints_its_own_layers(model) -> None:
    ckpt = copy.deepcopy(model)
    ac.checkpoint_trained_tower(ckpt)
    clone = copy.deepcopy(ckpt)
    for layer in clone.denoiser.layers:
        inner, hf_model, _ = layer.forward.args
        assert inner.__self__ is layer and hf_model is clone.denoiser.model


def test_recompute_without_the_run_is_caught(model, monkeypatch):
    """The control: a recompute outside the tower's run (what plain torch checkpointing of
    the HF layers would do) raises or gives other gradients -- the test above would see it."""
    monkeypatch.setattr(ac, "_reenter", lambda *a: ac.nullcontext())
    plain, ckpt = copy.deepcopy(model), copy.deepcopy(model)
    ac.checkpoint_trained_tower(ckpt)
    _, grads0 = _step(plain)
    try:
        _, grads1 = _step(ckpt)
    except RuntimeError as exc:  # attention outside a tower call
        assert "tower call" in str(exc) or "recomput" in str(exc).lower()
        return
    assert any(not torch.allclose(grads1[k], grads0[k]) for k in grads0)


def test_zero3_run_with_checkpointing_logs_the_same_losses_and_mfu(tmp_path, capsys) -> None:
    """Through the real engine (DeepSpeed ZeRO-3, parameters partitioned and gathered again
    for the recompute): the same losses as without checkpointing, and `mfu` in the log."""
    from conftest import TINY_TWO_TOWER_ZERO3, read_metrics

    from twotower_train.config import compose
    from twotower_train.run.train import train

    common = [*TINY_TWO_TOWER_ZERO3, "train.ckpt_every=1000", "data.val_sequences=0"]
    runs = {}
    for on in (False, True):
        run_dir = tmp_path / str(on)
        train(compose([*common, f"train.activation_checkpointing={on}", f"run.dir={run_dir}"]))
        runs[on] = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in runs[True]] == [1, 2, 3]
    for plain, ckpt in zip(runs[False], runs[True]):
        assert ckpt["loss"] == pytest.approx(plain["loss"], rel=1e-5)
        assert ckpt["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4)
        assert 0 < ckpt["mfu"] < 1
    out = capsys.readouterr().out
    assert "activation checkpointing" in out and " mfu " in out
