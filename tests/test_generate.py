"""Block-diffusion decoding and the AR baseline (``twotower_train/decoding.py``), CPU fp32."""

import copy

import pytest
import torch
from tiny_models import FAMILIES, tiny_backbone

from twotower_train.decoding import (
    DecodeConfig,
    GenerationStats,
    ar_generate,
    choose_tokens,
    commit_scores,
    confidence_unmask_step,
    diffusion_generate,
    filter_logits,
)
from twotower_train.model import TwoTowerModel

VOCAB, MASK, BS = 128, 127, 4
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [3, 4, 5, 6, 7, 8, 9, 10], [20, 21, 22]]


pytestmark = pytest.mark.usefixtures("one_thread")


_BACKBONES: dict = {}


def backbone(family):
    if family not in _BACKBONES:
        _BACKBONES[family] = tiny_backbone(family)
    return _BACKBONES[family]


def build(family, **kwargs):
    return TwoTowerModel.from_backbone(
        copy.deepcopy(backbone(family)), block_size=BS, mask_token_id=MASK, **kwargs
    )


# -- pure step math ---------------------------------------------------------------------------


def test_adjacent_rule_keeps_neighbours_apart_unless_both_are_sure():
    block = torch.full((1, 6), MASK)
    ids = torch.tensor([[10, 11, 12, 13, 14, 15]])
    conf = torch.tensor([[0.99, 0.9, 0.85, 0.99, 0.98, 0.2]])
    kw = dict(mask_id=MASK, threshold=0.8, steps_left=6)
    assert confidence_unmask_step(block, ids, conf, **kw).tolist() == [[10, 11, 12, 13, 14, MASK]]
    out = confidence_unmask_step(block, ids, conf, adjacent_threshold=0.95, **kw)
    # 0 commits; 1 (0.9) is next to 0 -> dropped; 2 (0.85) has no committed left neighbour;
    # 3 (0.99) is next to 2 (0.85 < 0.95) -> dropped; 4 next to 3 (dropped) -> commits
    assert out.tolist() == [[10, MASK, 12, MASK, 14, MASK]]
    # a neighbour committed in an EARLIER step does not count
    done = torch.tensor([[10, MASK, MASK, MASK, MASK, MASK]])
    out = confidence_unmask_step(done, ids, conf, adjacent_threshold=0.95, **kw)
    assert out.tolist() == [[10, 11, MASK, 13, 14, MASK]]
    # the per-step minimum (3 per step with 2 steps left) is made up by rank, whatever the rule
    low = torch.tensor([[0.99, 0.98, 0.1, 0.2, 0.3, 0.4]])
    out = confidence_unmask_step(
        block, ids, low, mask_id=MASK, threshold=0.9, steps_left=2, adjacent_threshold=0.995
    )
    assert out.tolist() == [[10, 11, MASK, MASK, MASK, 15]]


def test_prefix_order_commits_a_contiguous_run_from_the_left():
    block = torch.tensor([[5, MASK, MASK, MASK, MASK, MASK]])
    ids = torch.tensor([[5, 11, 12, 13, 14, 15]])
    conf = torch.tensor([[1.0, 0.9, 0.95, 0.3, 0.99, 0.99]])
    kw = dict(mask_id=MASK, steps_left=5, order="prefix")
    out = confidence_unmask_step(block, ids, conf, threshold=0.8, **kw)
    assert out.tolist() == [[5, 11, 12, MASK, MASK, MASK]]  # stops at the unsure position 3
    # nothing confident: the minimum comes from the left, not by confidence
    out = confidence_unmask_step(block, ids, conf, threshold=2.0, **kw)
    assert out.tolist() == [[5, 11, MASK, MASK, MASK, MASK]]
    out = confidence_unmask_step(
        block, ids, conf, threshold=2.0, mask_id=MASK, steps_left=2, order="prefix"
    )
    assert out.tolist() == [[5, 11, 12, 13, MASK, MASK]]


def test_margin_score_is_the_gap_to_the_runner_up():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.2], [0.9, 0.05, 0.05]]]))
    ids, conf = choose_tokens(logits)
    torch.testing.assert_close(commit_scores(logits, ids, conf, "confidence"), conf)
    torch.testing.assert_close(
        commit_scores(logits, ids, conf, "margin"), torch.tensor([[0.2, 0.85]])
    )
    with pytest.raises(ValueError, match="order"):
        DecodeConfig(order="random").validate()
    with pytest.raises(ValueError, match="score"):
        DecodeConfig(score="entropy").validate()


def test_unmask_step_commits_threshold_and_minimum():
    block = torch.full((2, 4), MASK)
    ids = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    conf = torch.tensor([[0.9, 0.2, 0.95, 0.1], [0.3, 0.4, 0.2, 0.1]])
    out = confidence_unmask_step(block, ids, conf, mask_id=MASK, threshold=0.8, steps_left=4)
    # row 0: both confident positions; row 1: none confident -> ceil(4 / 4) = 1, the best
    assert out.tolist() == [[10, MASK, 12, MASK], [MASK, 21, MASK, MASK]]
    # steps_left = 2 -> at least ceil(4 / 2) = 2 per row
    out = confidence_unmask_step(block, ids, conf, mask_id=MASK, threshold=2.0, steps_left=2)
    assert out.tolist() == [[10, MASK, 12, MASK], [20, 21, MASK, MASK]]
    # last step commits everything left; committed positions stay; width limits the span
    half = torch.tensor([[10, MASK, MASK, MASK]])
    out = confidence_unmask_step(
        half, ids[:1] + 100, conf[:1], mask_id=MASK, threshold=2.0, steps_left=1, width=3
    )
    assert out.tolist() == [[10, 111, 112, MASK]]
    # inactive rows are left alone
    out = confidence_unmask_step(
        block,
        ids,
        conf,
        mask_id=MASK,
        threshold=0.0,
        steps_left=1,
        active=torch.tensor([False, True]),
    )
    assert out[0].tolist() == [MASK] * 4 and out[1].tolist() == ids[1].tolist()


def test_filters_and_choice():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    p = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, 0.03
    kept = ~torch.isinf(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]
    assert p[0] < 0.7 < p[0] + p[1]
    ids, conf = choose_tokens(logits)
    assert ids.tolist() == [0] and conf.item() == pytest.approx(p[0].item())
    g = torch.Generator().manual_seed(0)
    ids, conf = choose_tokens(logits.expand(64, 4), temperature=1.0, top_k=1, generator=g)
    assert ids.eq(0).all()  # top-k 1 sampling is greedy
    g = torch.Generator().manual_seed(0)
    ids, conf = choose_tokens(logits.expand(256, 4), temperature=1.0, top_p=0.7, generator=g)
    assert set(ids.tolist()) == {0, 1}
    assert torch.allclose(conf, p[ids])  # the model's own probability of the sampled token


# -- decoding ---------------------------------------------------------------------------------


def test_one_token_per_step_when_threshold_unreachable():
    model = build("llama")
    seen = []
    inner = model.denoise_block

    def spy(cache, block, t=None):
        seen.append(int((block == MASK).sum()))
        return inner(cache, block, t)

    model.denoise_block = spy
    cfg = DecodeConfig(threshold=1.5, steps_per_block=BS, max_new_tokens=10, stop_at_eos=False)
    outs, stats = diffusion_generate(model, PROMPTS[:1], cfg, eos_id=None)
    assert len(outs[0]) == 10
    # blocks of 4, 4, then 2 needed positions (of a 4-wide block): one commit per forward
    assert seen == [4, 3, 2, 1, 4, 3, 2, 1, 4, 3]
    assert stats.denoiser_forwards == 10 and stats.tokens_per_forward == 1.0
    assert stats.context_forwards == 3  # prompt + two finished blocks (not the last one)


def test_low_threshold_decodes_in_fewer_forwards():
    model = build("llama")
    cfg = DecodeConfig(threshold=0.0, max_new_tokens=8, stop_at_eos=False)
    outs, stats = diffusion_generate(model, PROMPTS, cfg, eos_id=None)
    assert all(len(o) == 8 for o in outs)
    assert stats.denoiser_forwards == len(PROMPTS) * 2  # every block in one forward
    assert stats.tokens_per_forward == 4.0 and stats.new_tokens == 32
    assert stats.wall_s > 0 and stats.tokens_per_s > 0


RULES = {
    "any": {"order": "any"},
    "prefix+adjacent+margin": {"order": "prefix", "adjacent_threshold": 0.5, "score": "margin"},
}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("family", ["llama", "nemotron_h"])
def test_batched_equals_unbatched(family, rule):
    model = build(family)
    cfg = DecodeConfig(threshold=0.3, max_new_tokens=9, stop_at_eos=False, **RULES[rule])
    batched, stats = diffusion_generate(model, PROMPTS, cfg, eos_id=None)
    single = [diffusion_generate(model, [p], cfg, eos_id=None)[0][0] for p in PROMPTS]
    assert batched == single
    sub = diffusion_generate(model, PROMPTS, DecodeConfig(**{**vars(cfg), "batch_size": 1}), None)
    assert sub[0] == batched and sub[1].denoiser_forwards == stats.denoiser_forwards
    ar_batched, _ = ar_generate(model, PROMPTS, cfg, eos_id=None)
    assert ar_batched == [ar_generate(model, [p], cfg, eos_id=None)[0][0] for p in PROMPTS]
    # with an EOS some rows stop early and leave the batch (and its cache)
    for gen, outs in ((diffusion_generate, batched), (ar_generate, ar_batched)):
        eos = outs[0][3]
        stop = DecodeConfig(**{**vars(cfg), "stop_at_eos": True})
        cut, _ = gen(model, PROMPTS, stop, eos_id=eos)
        assert cut == [gen(model, [p], stop, eos_id=eos)[0][0] for p in PROMPTS]
        assert len(cut[0]) <= 3
        assert rule != "any" or any(len(c) == 9 for c in cut)  # some rows go on


def test_stops_at_eos():
    model = build("llama")
    cfg = DecodeConfig(threshold=0.0, max_new_tokens=12, stop_at_eos=False)
    for gen in (ar_generate, diffusion_generate):
        full, _ = gen(model, PROMPTS[:1], cfg, eos_id=None)
        eos = full[0][5]
        cut, stats = gen(model, PROMPTS[:1], DecodeConfig(threshold=0.0, max_new_tokens=12), eos)
        assert cut[0] == full[0][: full[0].index(eos)]
        assert stats.new_tokens == len(cut[0]) + 1  # the EOS was decoded too


def test_sampling_is_seeded():
    model = build("llama")
    cfg = DecodeConfig(temperature=1.0, top_k=20, top_p=0.9, max_new_tokens=8, stop_at_eos=False)
    a = diffusion_generate(model, PROMPTS, cfg, None, generator=torch.Generator().manual_seed(3))
    b = diffusion_generate(model, PROMPTS, cfg, None, generator=torch.Generator().manual_seed(3))
    assert a[0] == b[0]
    assert GenerationStats.combine([a[1], b[1]]).new_tokens == 2 * a[1].new_tokens


@pytest.mark.parametrize("family", ["llama", "nemotron_h"])
def test_ar_baseline_equals_hf_greedy_generate(family):
    model = build(family)
    hf_model = backbone(family)
    cfg = DecodeConfig(max_new_tokens=10, stop_at_eos=False)
    outs, stats = ar_generate(model, PROMPTS, cfg, eos_id=None)
    for prompt, out in zip(PROMPTS, outs):
        hf = hf_model.generate(
            torch.tensor([prompt]),
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
        assert hf[0, len(prompt) :].tolist() == out
    assert stats.tokens_per_forward == 1.0 and stats.denoiser_forwards == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_extended_cache_equals_recomputed_prefix(family):
    """Every denoiser call of a decode reads a cache grown block by block; recomputing the
    cache from the whole prefix in one forward gives the same logits (K/V and Mamba states),
    and so do the context tower's own logits."""
    model = build(family)
    calls = []
    inner = model.denoise_block

    def spy(cache, block, t=None):
        logits = inner(cache, block, t)
        calls.append((cache.length, block.clone(), logits))
        return logits

    model.denoise_block = spy
    prompt = PROMPTS[0]  # 5 tokens: blocks do not start at multiples of the block size
    cfg = DecodeConfig(threshold=0.5, max_new_tokens=12, stop_at_eos=False)
    outs, _ = diffusion_generate(model, [prompt], cfg, eos_id=None)
    seq = torch.tensor([prompt + outs[0]])
    assert len({length for length, _, _ in calls}) == 3  # three cached prefix lengths
    for length, block, logits in calls:
        cache, _ = model.context_extend(None, seq[:, :length])
        assert torch.allclose(inner(cache, block), logits, atol=1e-5, rtol=1e-4)
    grown, parts = None, []
    for start, stop in [(0, 5), (5, 9), (9, 13), (13, 17)]:
        grown, logits = model.context_extend(grown, seq[:, start:stop])
        parts.append(logits)
    full = model.context_logits(seq)
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)


def test_time_conditioned_decoding_and_likelihoods_read_the_mask_rate():
    """With time conditioning on, decoding, the left-to-right log-likelihood and the ELBO
    all run, and feed the denoiser the rate it was trained on: the block's masked fraction
    (decoding, log-likelihood) or m(t) of the ELBO's schedule."""
    from twotower_train.diffusion import mask_prob, sample_t
    from twotower_train.eval import likelihood

    model = build("llama", time_conditioning=True)
    with torch.no_grad():
        for p in model.denoiser.time_cond.parameters():
            p.add_(0.05 * torch.randn_like(p))
    seen = []
    denoise_block = model.denoise_block

    def spy(cache, block, t=None):
        seen.append(((block == MASK).float().mean(1), t))
        return denoise_block(cache, block, t=t)

    model.denoise_block = spy
    cfg = DecodeConfig(threshold=0.5, max_new_tokens=8, stop_at_eos=False)
    batched, _ = diffusion_generate(model, PROMPTS, cfg, eos_id=None)
    assert batched == [diffusion_generate(model, [p], cfg, eos_id=None)[0][0] for p in PROMPTS]
    assert seen and all(torch.equal(frac, t) for frac, t in seen)
    seen.clear()
    likelihood.denoiser_loglikelihood(model, [([5, 6, 7], [8, 9, 10, 11, 12])])
    assert seen and all(torch.equal(frac, t) for frac, t in seen)

    rates = []
    hook = model.register_forward_pre_hook(
        lambda mod, args, kwargs: rates.append(kwargs["t"]), with_kwargs=True
    )
    rows = torch.randint(3, 120, (2, 16))
    bound, _ = likelihood.diffusion_elbo(model, rows, samples=1, seed=5, schedule="cosine")
    hook.remove()
    assert torch.isfinite(torch.tensor(bound))
    # the same draw of t the ELBO makes (seed + sample 0), through the cosine schedule
    t = sample_t(
        2, 4, per="block", eps=1e-3, antithetic=True, generator=torch.Generator().manual_seed(5)
    )
    (rate,) = rates
    torch.testing.assert_close(rate, mask_prob(t, "cosine"))
    assert not torch.allclose(rate, t)


@pytest.mark.parametrize("family", ["llama", "qwen3", "nemotron_h"])
def test_verified_decoding_is_ar_greedy(family):
    """verify=True: token for token the backbone's greedy decoding -- batched or not, prompts
    of different lengths, budgets that end inside a block, EOS inside a block, every
    threshold (the untrained denoiser's drafts are mostly rejected: the rollback runs)."""
    model = build(family)
    budget = 11  # ends inside the third block of 4
    ar, _ = ar_generate(
        model, PROMPTS, DecodeConfig(max_new_tokens=budget, stop_at_eos=False), None
    )
    rules = ((0.0, {}), (0.8, RULES["any"]), (2.0, {}), (0.5, RULES["prefix+adjacent+margin"]))
    for threshold, rule in rules:
        cfg = DecodeConfig(
            threshold=threshold, max_new_tokens=budget, stop_at_eos=False, verify=True, **rule
        )
        got, stats = diffusion_generate(model, PROMPTS, cfg, eos_id=None)
        assert got == ar
        assert [diffusion_generate(model, [p], cfg, None)[0][0] for p in PROMPTS] == ar
        assert stats.rounds > 0 and stats.tokens_per_step >= 1.0
        assert stats.new_tokens == len(PROMPTS) * budget
    # an EOS inside a block: the AR output cut there, with the EOS counted
    eos = ar[0][5]
    want, ar_stats = ar_generate(model, PROMPTS, DecodeConfig(max_new_tokens=budget), eos)
    cfg = DecodeConfig(threshold=0.8, max_new_tokens=budget, verify=True)
    got, stats = diffusion_generate(model, PROMPTS, cfg, eos)
    assert got == want and stats.new_tokens == ar_stats.new_tokens


def test_verified_decoding_accepts_a_perfect_draft():
    """A denoiser whose drafts are the backbone's choices has every token accepted: each
    round keeps a whole block (no rollback) and the stats say so."""
    model = build("llama", layers=None)
    budget = 12
    ar, _ = ar_generate(model, PROMPTS[:1], DecodeConfig(max_new_tokens=budget), None)
    target = ar[0]
    prompt_len = len(PROMPTS[0])

    def oracle(cache, block, t=None):  # logits that put all mass on the AR continuation
        start = cache.length - prompt_len
        logits = torch.full((*block.shape, VOCAB), -1e4)
        for i in range(block.shape[1]):
            if start + i < len(target):
                logits[:, i, target[start + i]] = 0.0
        return logits

    model.denoise_block = oracle
    cfg = DecodeConfig(threshold=0.5, max_new_tokens=budget, stop_at_eos=False, verify=True)
    got, stats = diffusion_generate(model, PROMPTS[:1], cfg, None)
    # every round: the backbone's carry + BS - 1 drafted tokens, all accepted
    assert got == ar and stats.rounds == stats.draft_rounds == budget // BS
    assert stats.mean_accepted == BS - 1 and stats.tokens_per_step == BS
    assert stats.denoiser_forwards == stats.rounds  # one denoiser forward per draft


def test_verified_decoding_refuses_sampling():
    with pytest.raises(ValueError, match="verify=True is greedy"):
        DecodeConfig(temperature=1.0, verify=True).validate()


def test_decoding_restores_the_training_flag():
    model = build("llama")
    cfg = DecodeConfig(max_new_tokens=5)
    model.train()
    diffusion_generate(model, PROMPTS[:1], cfg, None)
    assert model.training and model.denoiser.training and not model.context.training
    model.eval()
    diffusion_generate(model, PROMPTS[:1], cfg, None)
    assert not model.training and not model.denoiser.training


@pytest.mark.parametrize("family", ["llama", "nemotron_h"])
def test_context_extend_last_only_is_the_last_row(family):
    model = build(family)
    with torch.no_grad():
        full_cache, full = model.context_extend(None, torch.tensor([PROMPTS[2]]))
        cache, last = model.context_extend(None, torch.tensor([PROMPTS[2]]), last_only=True)
    assert last.shape == (1, 1, VOCAB)
    torch.testing.assert_close(last[:, 0], full[:, -1])
    torch.testing.assert_close(cache.last_logits, full_cache.last_logits)
    for li in full_cache.keys:
        torch.testing.assert_close(cache.keys[li], full_cache.keys[li])


def test_draft_policy_backs_off_a_losing_drafter_and_keeps_a_winning_one():
    from twotower_train.decoding import DraftPolicy

    losing = DraftPolicy(max_cap=7)
    drafts = 0
    for _ in range(200):  # each draft round: 1 token in 3 s; each AR step: 1 token in 1 s
        called = losing.cap() > 0
        drafts += called
        losing.update(
            called,
            drafted=3 if called else 0,
            accepted=0,
            seconds=3.0 if called else 1.0,
            draft_seconds=2.0,
        )
    assert drafts <= 8 and losing._backoff == losing.max_backoff  # probes ever more rarely
    winning = DraftPolicy(max_cap=7)
    for _ in range(50):  # each draft round: 6 tokens in 2 s
        assert winning.cap() > 0
        winning.update(True, drafted=5, accepted=5, seconds=2.0, draft_seconds=1.0)
    assert winning.cap() == 7
    # a rejection shrinks the cap towards what was accepted, a full acceptance grows it
    winning.update(True, drafted=7, accepted=1, seconds=1.0, draft_seconds=0.5)
    assert winning.cap() == 3
    winning.update(True, drafted=3, accepted=3, seconds=1.0, draft_seconds=0.5)
    assert winning.cap() == 6
    assert DraftPolicy(max_cap=7, adaptive=False).cap() == 7
