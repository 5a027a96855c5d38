"""Every causal LM family transformers ships: the towers serve it exactly, or refuse it in one
line. The list comes from transformers' own registry (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``),
so a family is tested the day it appears. The families of ``tiny_models.FAMILIES`` also run
the full model test files (``test_model_two_tower.py``, ``test_model_leakage.py``)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_model_leakage import dependency, expected
from tiny_models import FAMILIES, registry_backbone, tiny_backbone
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from twotower_train.model import TwoTowerModel
from twotower_train.model.registry import UnsupportedBackbone

pytestmark = pytest.mark.usefixtures("one_thread")

MASK, BLOCK, LENGTH = 127, 4, 12
REGISTRY = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def rel_err(actual, expected_):
    return ((actual - expected_).abs().max() / expected_.abs().max().clamp(min=1)).item()


def build(backbone, **kwargs):
    return TwoTowerModel.from_backbone(
        copy.deepcopy(backbone), block_size=BLOCK, mask_token_id=MASK, **kwargs
    )


def inputs(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, min(vocab, MASK), (1, LENGTH), generator=g)
    noisy = torch.where(torch.rand(clean.shape, generator=g) < 0.5, MASK, clean)
    return clean, noisy


def check_served_exactly(backbone, tol: float = 1e-5, exact_dependencies: bool = True) -> None:
    """What a family must satisfy (fp32): context logits = the HF model's own; a cache grown
    chunk by chunk = one pass; one-pass training forward = the per-block reference loop
    (with and without documents); each output depends on exactly the inputs it may
    (clean earlier blocks, its own noisy block: exactly, or a subset where the family's
    mixers are causal inside a block, e.g. Mamba-only); SDPA = FlexAttention."""
    model = build(backbone).eval()
    clean, noisy = inputs(backbone.get_input_embeddings().num_embeddings)
    docs = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        hf = backbone(clean, use_cache=False).logits.float()
        assert rel_err(model.context_logits(clean), hf) <= tol
        cache, parts = None, []
        for start, stop in [(0, 5), (5, 6), (6, LENGTH)]:
            cache, logits = model.context_extend(cache, clean[:, start:stop])
            parts.append(logits)
        assert rel_err(torch.cat(parts, 1), hf) <= tol
        # the denoiser on a cache grown block by block = on a cache of the whole prefix
        grown = None
        for n in range(2):
            grown, _ = model.context_extend(grown, clean[:, n * BLOCK : (n + 1) * BLOCK])
        whole, _ = model.context_extend(None, clean[:, : 2 * BLOCK])
        block = noisy[:, 2 * BLOCK :]
        assert rel_err(model.denoise_block(grown, block), model.denoise_block(whole, block)) <= tol
        one_pass = model(clean, noisy)
        assert rel_err(one_pass, model.reference_forward(clean, noisy)) <= tol
        with_docs = model(clean, noisy, doc_ids=docs)
        assert rel_err(with_docs, model.reference_forward(clean, noisy, doc_ids=docs)) <= tol
        flex = build(backbone, attn_impl="flex").eval()
        assert rel_err(flex(clean, noisy), one_pass) <= tol
        assert rel_err(flex(clean, noisy, doc_ids=docs), with_docs) <= tol
    want_clean, want_noisy = expected(LENGTH, BLOCK)
    with torch.no_grad():
        assert torch.equal(dependency(model, clean, noisy, "clean"), want_clean)
        noisy_dep = dependency(model, clean, noisy, "noisy")
    assert not (noisy_dep & ~want_noisy).any(), "an output reads a noisy token it may not"
    if exact_dependencies:
        assert torch.equal(noisy_dep, want_noisy)


@pytest.mark.parametrize("model_type", REGISTRY)
def test_every_registry_family_is_served_or_refused(model_type: str) -> None:
    backbone = registry_backbone(model_type)
    if isinstance(backbone, str):
        pytest.skip(f"no tiny {model_type}: {backbone}")
    try:
        build(backbone)
    except UnsupportedBackbone as exc:
        message = str(exc)
        assert "\n" not in message and repr(model_type) in message, message
        if model_type in FAMILIES:
            raise AssertionError(f"a named family is refused: {message}") from None
        return
    # the registry's default configs: fp32 sums in other orders (1e-4), and some families
    # are Mamba-only at the tiny sizes (causal inside a block)
    check_served_exactly(backbone, tol=1e-4, exact_dependencies=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_named_families_are_served(family: str) -> None:
    check_served_exactly(tiny_backbone(family))


def tiny(config_cls, model_cls, **kwargs):
    from tiny_models import TINY_SIZES

    torch.manual_seed(0)
    return model_cls(config_cls(**{**TINY_SIZES, **kwargs})).eval()


def test_refusals_name_what_is_missing() -> None:
    import transformers as tf

    cases = [
        # token mixing outside the registry (short convolutions) would leak in the denoiser
        (
            tiny(
                tf.Lfm2Config,
                tf.Lfm2ForCausalLM,
                num_hidden_layers=4,
                layer_types=["conv", "full_attention", "conv", "full_attention"],
            ),
            "layers [0, 2] mix tokens outside the registry",
        ),
        (tiny(tf.BertConfig, tf.BertLMHeadModel), "bidirectional"),  # (is_decoder=True: served)
        (tiny(tf.GptOssConfig, tf.GptOssForCausalLM), "'s_aux'"),
        (tiny(tf.T5Config, tf.T5ForConditionalGeneration), "encoder-decoder"),
    ]
    for backbone, what in cases:
        with pytest.raises(UnsupportedBackbone) as info:
            build(backbone)
        message = str(info.value)
        assert what in message and "\n" not in message, message
        assert message.startswith(f"backbone model_type {backbone.config.model_type!r}")
