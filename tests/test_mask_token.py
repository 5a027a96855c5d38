"""Backbones without a mask token: the denoiser gets its own [MASK] row; a mask id the
tokenizer produces is refused; GGUF backbones load through the cache."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_backbone

from twotower_train.backbones import (
    build_two_tower,
    check_mask_id,
    release_tokenizer_with_mask,
)
from twotower_train.decoding import DecodeConfig, ar_generate, diffusion_generate
from twotower_train.model import TwoTowerConfig, TwoTowerModel
from twotower_train.model.hub import BackboneError, resolve
from twotower_train.model.mask_embedding import AddedMaskEmbedding, forbid_mask
from twotower_train.release import save_release
from twotower_train.tiny_world import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 128  # tiny_backbone's vocabulary
BS = 4


def added(family: str = "llama", **kw) -> TwoTowerModel:
    backbone = tiny_backbone(family, vocab_size=VOCAB, **kw)
    return TwoTowerModel.from_backbone(backbone, block_size=BS, mask_token_id=VOCAB)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_an_added_mask_has_its_own_row_starting_at_the_mean(family: str) -> None:
    model = added(family)
    embed = model.denoiser.embed
    assert isinstance(embed, AddedMaskEmbedding) and embed.num_embeddings == VOCAB + 1
    # the context tower keeps the backbone's vocabulary; the head still predicts VOCAB tokens
    assert model.backbone.get_input_embeddings().num_embeddings == VOCAB
    assert model.denoiser.head.weight.shape[0] == VOCAB
    torch.testing.assert_close(embed.mask_embedding, embed.weight.mean(0))
    # a real token reads exactly what the copied embedding gave it (Gemma's scale included)
    ids = torch.tensor([[3, 5, VOCAB, 7]])
    plain = model.backbone.get_input_embeddings()(ids.clamp(max=VOCAB - 1))
    out = embed(ids)
    torch.testing.assert_close(out[:, [0, 1, 3]], plain[:, [0, 1, 3]])
    scale = embed.scale or 1.0
    torch.testing.assert_close(out[0, 2], embed.mask_embedding * scale)


def test_the_added_row_is_trained_and_the_tied_head_stays_tied() -> None:
    model = added("llama", tie_word_embeddings=True)
    embed, head = model.denoiser.embed, model.denoiser.head
    assert head.weight is embed.weight
    clean = torch.randint(3, VOCAB, (2, 8))
    noisy = clean.clone()
    noisy[:, 4:] = VOCAB
    logits = model(clean, noisy)
    assert logits.shape == (2, 8, VOCAB)
    torch.nn.functional.cross_entropy(
        logits[:, 4:].flatten(0, 1), clean[:, 4:].flatten()
    ).backward()
    assert embed.mask_embedding.grad is not None and embed.mask_embedding.grad.abs().sum() > 0
    assert embed.weight.grad is not None


def test_a_release_with_an_added_mask_round_trips(tmp_path: Path) -> None:
    model = added("llama")
    with torch.no_grad():
        model.denoiser.embed.mask_embedding.add_(1.0)  # as after training
    save_release(model, None, tmp_path / "release", dtype=torch.float32)
    back = TwoTowerModel.from_release(tmp_path / "release")
    assert isinstance(back.denoiser.embed, AddedMaskEmbedding)
    torch.testing.assert_close(
        back.denoiser.embed.mask_embedding, model.denoiser.embed.mask_embedding
    )
    clean = torch.randint(3, VOCAB, (1, 8))
    noisy = clean.clone()
    noisy[:, 4:] = VOCAB
    with torch.no_grad():
        torch.testing.assert_close(back(clean, noisy), model(clean, noisy))


def test_decoding_with_an_added_mask_never_emits_it() -> None:
    model = added("llama").eval()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    outs, stats = diffusion_generate(model, prompts, DecodeConfig(max_new_tokens=9), None)
    assert all(VOCAB not in o and len(o) == 9 for o in outs)
    ar, _ = ar_generate(model, prompts, DecodeConfig(max_new_tokens=9), None)
    cfg = DecodeConfig(max_new_tokens=9, verify=True, threshold=0.0)
    got, _ = diffusion_generate(model, prompts, cfg, None)
    assert got == ar  # lossless with an added mask too


def test_forbid_mask_copies_and_skips_a_missing_column() -> None:
    logits = torch.zeros(2, 3, 5)
    out = forbid_mask(logits, 4)
    assert out[..., 4].eq(-torch.inf).all() and logits.eq(0).all()
    assert forbid_mask(logits, 5) is logits


def _tokenizer_without_mask():
    tokenizer = load_tokenizer()
    tokenizer.mask_token = None
    assert tokenizer.mask_token_id is None
    return tokenizer


def test_a_tokenizer_without_mask_gets_an_added_one() -> None:
    tokenizer = _tokenizer_without_mask()
    backbone = tiny_backbone("llama", vocab_size=len(tokenizer))
    model = build_two_tower(backbone, tokenizer, TwoTowerConfig(block_size=BS))
    assert model.mask_token_id == len(tokenizer)
    assert isinstance(model.denoiser.embed, AddedMaskEmbedding)
    # the release's tokenizer names it; the training tokenizer is untouched
    shipped = release_tokenizer_with_mask(tokenizer, model.mask_token_id)
    assert shipped.mask_token == "[MASK]" and shipped.mask_token_id == model.mask_token_id
    assert tokenizer.mask_token_id is None and len(tokenizer) == model.mask_token_id
    assert tokenizer.encode("[MASK]") != [model.mask_token_id]


def test_a_mask_id_the_tokenizer_produces_is_refused_in_one_line() -> None:
    tokenizer = _tokenizer_without_mask()
    real = tokenizer.encode("add")[0]
    with pytest.raises(BackboneError) as err:
        check_mask_id(real, tokenizer)
    assert "a token the tokenizer produces" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(BackboneError):
        check_mask_id(tokenizer.eos_token_id, tokenizer)
    check_mask_id(len(tokenizer) + 5, tokenizer)  # past the vocabulary: never produced
    check_mask_id(2, load_tokenizer())  # the tokenizer's own mask token


def test_a_reserved_special_token_may_serve_as_mask() -> None:
    tokenizer = _tokenizer_without_mask()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|reserved_special_token_0|>"]})
    reserved = tokenizer.convert_tokens_to_ids("<|reserved_special_token_0|>")
    check_mask_id(reserved, tokenizer)


def test_a_missing_gguf_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="GGUF file .*nope.gguf does not exist"):
        resolve(str(tmp_path / "nope.gguf"))
    with pytest.raises(BackboneError, match="does not exist"):
        resolve(str(tmp_path), gguf_file="nope.gguf")


def test_an_unreadable_gguf_file_is_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TWOTOWER_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(BackboneError, match="cannot read GGUF file"):
        resolve(str(bad))
    assert not list((tmp_path / "cache").rglob("config.json"))  # nothing half-written


@pytest.mark.assets
def test_smollm2_gguf_loads_and_builds_with_an_added_mask() -> None:
    """The real SmolLM2-135M-Instruct GGUF: dequantized into the cache, its tokenizer from the
    same file, no mask token, so the denoiser gets [MASK] = 49152."""
    from twotower_train.assets import AssetMissing, asset_path
    from twotower_train.backbones import load_backbone, load_tokenizer
    from twotower_train.config import BackboneConfig

    try:
        folder = asset_path("smollm2-135m-instruct")
    except AssetMissing as exc:
        pytest.skip(f"{exc}")
    gguf = next(folder.rglob("*.gguf"))
    cfg = BackboneConfig(name_or_path=str(gguf))
    tokenizer = load_tokenizer(cfg)
    backbone = load_backbone(cfg, tokenizer)
    assert backbone.config.vocab_size == 49152 and tokenizer.eos_token_id == 2
    assert tokenizer.mask_token_id is None
    same = resolve(str(gguf.parent), gguf_file=gguf.name)
    assert same == resolve(str(gguf))  # one cached conversion
    trimmed = copy.deepcopy(backbone)
    trimmed.model.layers = trimmed.model.layers[:2]
    trimmed.config.num_hidden_layers = 2
    model = build_two_tower(trimmed, tokenizer, TwoTowerConfig(block_size=BS))
    assert model.mask_token_id == 49152
    ids = tokenizer.encode("The capital of France is")
    outs, _ = ar_generate(model, [ids], DecodeConfig(max_new_tokens=4), tokenizer.eos_token_id)
    assert len(outs[0]) == 4
