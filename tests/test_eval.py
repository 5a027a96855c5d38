"""The retained-performance harness, likelihoods, tasks and the lm-eval adapter (CPU)."""

import copy
import json
from dataclasses import replace

import pytest
import torch
from tiny_models import tiny_backbone

from twotower_train.eval import likelihood, tasks
from twotower_train.eval import tiny_world_tasks as tiny_tasks
from twotower_train.eval.harness import EvalConfig, evaluate
from twotower_train.eval.report import (
    REPORT_KEYS,
    TaskScore,
    build_report,
    report_markdown,
    retained_interval,
    retained_ratios,
    wilson_interval,
)
from twotower_train.model import TwoTowerModel
from twotower_train.tiny_world import TASKS, load_test_tasks, load_tokenizer

MASK, BS = 2, 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def hf_backbone():
    return tiny_backbone("llama", vocab_size=2048)  # the tiny world's vocabulary


@pytest.fixture(scope="module")
def model(hf_backbone):
    return TwoTowerModel.from_backbone(
        copy.deepcopy(hf_backbone), block_size=BS, mask_token_id=MASK
    )


# -- tasks and ratios -------------------------------------------------------------------------


def test_mc_examples_are_deterministic_and_well_formed():
    items = tiny_tasks.mc_examples()
    assert items == tiny_tasks.mc_examples()
    assert len(items) == tiny_tasks.MC_PER_TASK * len(TASKS)
    answers = {ex["prompt"]: ex["answer"] for ex in load_test_tasks()}
    for item in items:
        assert len(set(item["choices"])) == 4
        assert item["choices"][item["label"]] == answers[item["prompt"]]
    assert [it["task"] for it in tiny_tasks.mc_examples(5)] == list(TASKS)


def test_task_registry():
    registry = tasks.registry()
    assert [n for n in registry if isinstance(registry[n], tasks.GenerationTask)][:5] == list(TASKS)
    assert isinstance(tasks.get("perplexity"), tasks.PerplexityTask)
    assert isinstance(tasks.get("tiny_world_mc"), tasks.ChoiceTask)
    with pytest.raises(ValueError, match="already registered"):
        tasks.register(tasks.GenerationTask("add", lambda limit: []))
    with pytest.raises(ValueError, match="unknown eval task"):
        tasks.get("nope")


def test_retained_ratios():
    scores = [
        TaskScore("a", "em", backbone=0.8, twotower=0.4),
        TaskScore("b", "em", backbone=0.2, twotower=0.2),
        TaskScore("z", "em", backbone=0.0, twotower=0.1),  # no ratio of its own
        TaskScore("ppl", "ppl", backbone=2.0, twotower=4.0, higher_is_better=False),
    ]
    retained, mean_of_ratios = retained_ratios(scores)
    assert retained == pytest.approx((0.4 + 0.2 + 0.1) / (0.8 + 0.2 + 0.0))
    assert mean_of_ratios == pytest.approx((0.5 + 1.0) / 2)
    assert scores[2].retained is None and scores[3].retained == 0.5


def test_wilson_interval_known_values():
    # Textbook values (Wilson 1927; e.g. Brown, Cai & DasGupta 2001): 50 of 100, 0 and n of n.
    assert wilson_interval(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0.9, 200) == pytest.approx((0.8506, 0.9344), abs=1e-4)
    lo, hi = wilson_interval(1.0, 200)
    assert lo == pytest.approx(0.98115, abs=1e-4) and hi == pytest.approx(1.0)
    lo, hi = wilson_interval(0.0, 200)
    assert lo == 0.0 and hi == pytest.approx(0.01885, abs=1e-4)
    assert wilson_interval(0.5, 0) is None


def test_retained_interval_covers_simulated_ratios():
    """The delta-method interval against the spread of the ratio of averages over simulated
    evaluations of the same two models (independent binomial draws, as it assumes)."""
    back = [0.98, 1.0, 0.435, 0.885]
    two = [0.97, 0.955, 0.39, 0.885]
    n = 200
    scores = [TaskScore(str(i), "em", b, t, n=n) for i, (b, t) in enumerate(zip(back, two))]
    lo, hi = retained_interval(scores)
    assert lo < sum(two) / sum(back) < hi
    gen = torch.Generator().manual_seed(0)
    draws = 4000

    def simulated_mean(accuracies: list[float]) -> torch.Tensor:
        """Mean accuracy over the tasks in each of ``draws`` simulated evaluations."""
        counts = torch.full((draws,), float(n))
        return torch.stack(
            [
                torch.binomial(counts, torch.tensor(p).expand(draws), generator=gen) / n
                for p in accuracies
            ]
        ).mean(0)

    sim_two, sim_back = simulated_mean(two), simulated_mean(back)
    ratio = sim_two / sim_back
    inside = ((ratio >= lo) & (ratio <= hi)).float().mean().item()
    assert 0.93 < inside < 0.97  # a 95% interval, up to the normal approximation
    # No sample size, no interval; perplexity rows are not counted.
    assert retained_interval([TaskScore("a", "em", 0.5, 0.5)]) is None
    ppl = TaskScore("ppl", "ppl", 2.0, 4.0, higher_is_better=False)
    assert retained_interval(scores + [ppl]) == (lo, hi)


def test_report_carries_intervals():
    scores = [
        TaskScore("add", "exact_match", 0.98, 0.97, n=200),
        TaskScore("ppl", "perplexity", 3.0, 9.0, higher_is_better=False, n=200),
    ]
    report = build_report(
        scores, tokens_per_forward=3.0, speed=None, sweep=[], decode={}, config={}, wall_s=1.0
    )
    add, ppl = report["tasks"]
    assert add["twotower_interval"] == wilson_interval(0.97, 200)
    assert add["backbone_interval"] == wilson_interval(0.98, 200)
    assert "twotower_interval" not in ppl  # not a share of examples
    assert report["retained_interval"] == retained_interval(scores)
    text = report_markdown(report)
    lo, hi = wilson_interval(0.97, 200)
    assert f"0.97 [{lo:.3f}, {hi:.3f}]" in text and "95% interval" in text


# -- likelihoods ------------------------------------------------------------------------------


def test_ar_loglikelihood_equals_hf(model, hf_backbone):
    requests = [([5, 6, 7], [8, 9]), ([10, 11], [12, 13, 14, 15, 16]), ([4], [4])]
    got = likelihood.ar_loglikelihood(model, requests, batch_size=2)
    for (ctx, cont), (lp, greedy) in zip(requests, got):
        with torch.no_grad():
            logp = hf_backbone(torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
        rows = logp[len(ctx) - 1 : -1]
        assert lp == pytest.approx(float(rows.gather(-1, torch.tensor(cont)[:, None]).sum()), 1e-4)
        assert greedy == bool((rows.argmax(-1) == torch.tensor(cont)).all())


def test_denoiser_loglikelihood_is_the_left_to_right_chain(model):
    ctx, cont = [5, 6, 7], [8, 9, 10, 11, 12, 13]  # two blocks: 4 + 2 tokens
    (lp, _), (lp_batched, _) = likelihood.denoiser_loglikelihood(
        model, [(ctx, cont), (ctx, cont)], max_rows=3
    )[:2]
    expected = 0.0
    with torch.no_grad():
        for k in range(2):
            cache, _ = model.context_extend(None, torch.tensor([ctx + cont[: k * BS]]))
            chunk = cont[k * BS : (k + 1) * BS]
            for i, tok in enumerate(chunk):
                noisy = torch.tensor([chunk[:i] + [MASK] * (BS - i)])
                logits = model.denoise_block(cache, noisy)[0, i]
                logits[MASK] = -torch.inf
                expected += float(logits.log_softmax(-1)[tok])
    assert lp == pytest.approx(expected, rel=1e-5) and lp_batched == pytest.approx(lp, rel=1e-6)


def test_perplexity_and_elbo(model, hf_backbone, tokenizer):
    rows = tiny_tasks.perplexity_rows(tokenizer, 16, limit=6)
    assert rows.shape == (6, 16) and (rows == tokenizer.eos_token_id).any()
    nll, n = likelihood.ar_nll(model, rows, batch_size=4)
    with torch.no_grad():
        logits = hf_backbone(rows).logits[:, :-1]
    expected = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum"
    )
    assert n == 6 * 15 and nll == pytest.approx(float(expected), rel=1e-5)
    assert nll / n == pytest.approx(7.6, abs=0.5)  # an untrained model: about ln(2048)
    a, per = likelihood.diffusion_elbo(model, rows, samples=2, seed=3, batch_size=4)
    b, _ = likelihood.diffusion_elbo(model, rows, samples=2, seed=3, batch_size=6)
    assert len(per) == 2 and a == pytest.approx(b, rel=1e-5) and 0 < a < 100


# -- the harness end to end -------------------------------------------------------------------


class _WandbRun:
    def __init__(self):
        self.logged, self.summary = [], {}

    def log(self, payload, step=None):
        self.logged.append((step, payload))


class _Logger:
    def __init__(self):
        self.records = []
        self.wandb = _WandbRun()

    def log(self, step, metrics):
        self.records.append((step, metrics))


def test_evaluate_writes_the_report(model, tokenizer, tmp_path):
    cfg = EvalConfig(
        max_examples_per_task=2,
        max_new_tokens=6,
        threshold=0.8,
        threshold_sweep=[0.5, 0.95],
        elbo_samples=1,
        speed_examples=2,
        perplexity_seq_len=16,
        batch_size=8,
    )
    logger = _Logger()
    model.train()
    report = evaluate(model, tokenizer, cfg, tmp_path / "eval", logger=logger, step=7)
    assert model.denoiser.training  # the training flag is restored
    model.eval()
    on_disk = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    for key in REPORT_KEYS:
        assert key in on_disk
    names = [t["name"] for t in on_disk["tasks"]]
    assert names == [*TASKS, tiny_tasks.MC_TASK, tiny_tasks.PERPLEXITY]
    for t in on_disk["tasks"]:
        assert {"name", "metric", "backbone", "twotower", "retained"} <= set(t)
    assert on_disk["retained_tasks"] == names[:-1]
    assert [r["threshold"] for r in on_disk["sweep"]] == [0.5, 0.8, 0.95]
    assert on_disk["tokens_per_forward"] >= 1.0 and on_disk["speedup_vs_ar"] > 0
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "| add | exact_match |" in md and "retained" in md
    png = (tmp_path / "eval" / "retained_vs_tokens_per_forward.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    step, metrics = logger.records[0]
    assert step == 7 and "eval/tokens_per_forward" in metrics
    ((wb_step, payload),) = logger.wandb.logged  # the side-by-side table and the plot
    assert wb_step == 7 and len(payload["eval/table"].data) == len(names)
    tpf = logger.wandb.summary["eval/tokens_per_forward"]
    assert tpf == pytest.approx(report["tokens_per_forward"])


def test_harness_scores_a_registered_task(model, tokenizer, tmp_path):
    """A task that is not the tiny world's: registered, then scored like the built-ins."""
    examples = [{"prompt": "add 1 2 =", "answer": " 3"}, {"prompt": "copy a b =", "answer": " a b"}]
    tasks.register(tasks.GenerationTask("my_task", lambda limit: examples[:limit]))
    cfg = EvalConfig(
        tasks=["my_task"],
        max_examples_per_task=2,
        max_new_tokens=4,
        threshold_sweep=[],
        speed_examples=0,
    )
    report = evaluate(model, tokenizer, cfg, tmp_path)
    ((row,),) = [[t for t in report["tasks"] if t["name"] == "my_task"]]
    assert row["n"] == 2 and 0.0 <= row["backbone"] <= 1.0


def test_verified_mode_is_reported_and_lossless(model, tokenizer, tmp_path):
    cfg = EvalConfig(
        tasks=["add", "copy"],
        max_examples_per_task=3,
        max_new_tokens=6,
        threshold_sweep=[],
        speed_examples=2,
        batch_size=8,
        verify=True,
    )
    report = evaluate(model, tokenizer, cfg, tmp_path)
    verified = report["verified"]
    assert {"retained", "tokens_per_step", "mean_accepted", "speedup_vs_ar"} <= set(verified)
    for t in report["tasks"]:  # token for token the backbone's decoding: the same scores
        assert verified["tasks"][t["name"]] == t["backbone"]
    assert verified["tokens_per_step"] >= 1.0 and verified["speedup_vs_ar"] > 0
    assert verified["threshold"] == 0.5  # eval.verify_threshold: drafts are a speed knob
    assert "Verified decoding" in (tmp_path / "report.md").read_text()
    # null: drafts at the main threshold; the scores stay the backbone's
    same = evaluate(model, tokenizer, replace(cfg, verify_threshold=None), tmp_path / "same")
    assert same["verified"]["threshold"] == cfg.threshold
    assert same["verified"]["tasks"] == verified["tasks"]
    assert json.loads((tmp_path / "report.json").read_text())["verified"]["tasks"]


def test_unknown_task_is_refused(model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="unknown eval task"):
        evaluate(model, tokenizer, EvalConfig(tasks=["nope"]), tmp_path)


# -- lm-evaluation-harness adapter ------------------------------------------------------------


def test_lm_eval_adapter_offline(model, hf_backbone, tokenizer, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    from twotower_train.eval.lm_eval_adapter import LOCAL_TASKS, TwoTowerLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    manager = TaskManager(include_path=str(LOCAL_TASKS), include_defaults=False)
    items = tiny_tasks.mc_examples(3)
    for tower, score in (
        ("backbone", likelihood.ar_loglikelihood),
        ("twotower", likelihood.denoiser_loglikelihood),
    ):
        lm = TwoTowerLM(model, tokenizer, tower=tower, batch_size=8)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=["tiny_world_mc", "tiny_world_gen"],
            task_manager=manager,
            limit=3,
            bootstrap_iters=0,
        )
        results = out["results"]
        assert 0.0 <= results["tiny_world_mc"]["acc,none"] <= 1.0
        assert 0.0 <= results["tiny_world_gen"]["exact_match,none"] <= 1.0
        # the adapter's loglikelihood is the harness's, request for request
        first = items[0]
        reqs = [
            Instance("loglikelihood", {}, (first["prompt"], c), i)
            for i, c in enumerate(first["choices"])
        ]
        direct = score(
            model,
            [tasks.split_continuation(tokenizer, first["prompt"], c) for c in first["choices"]],
        )
        assert [lp for lp, _ in lm.loglikelihood(reqs)] == pytest.approx([lp for lp, _ in direct])
        if tower == "backbone":  # and, independently, the HF model's own chain rule
            ctx, cont = tasks.split_continuation(tokenizer, first["prompt"], first["choices"][0])
            with torch.no_grad():
                logp = hf_backbone(torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
            want = float(logp[len(ctx) - 1 : -1].gather(-1, torch.tensor(cont)[:, None]).sum())
            assert lm.loglikelihood(reqs[:1])[0][0] == pytest.approx(want, rel=1e-4)
        rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("a b c",), 0)])
        assert len(rolling) == 1 and rolling[0] < 0
        gen = lm.generate_until(
            [Instance("generate_until", {}, ("add 1 2 =", {"until": [" "], "max_gen_toks": 5}), 0)]
        )
        assert len(gen) == 1 and " " not in gen[0]


def test_answer_block_metrics_against_the_training_forward(model, tokenizer):
    """The decode-mirroring metric (prompt clean, answer opening a fully masked block) equals
    a direct computation through the one-pass TRAINING forward on the row prompt + block."""
    from twotower_train.eval.harness import answer_block_metrics

    by_len: dict[int, list] = {}
    for ex in load_test_tasks():
        k = len(tasks.split_continuation(tokenizer, ex["prompt"], ex["answer"])[0])
        if k % BS == 0 and len(by_len.setdefault(k, [])) < 3:
            by_len[k].append(ex)
    examples = [ex for group in by_len.values() for ex in group]
    assert len(by_len) > 1 and len(examples) > 3  # several length groups
    got = answer_block_metrics(model, tokenizer, examples, batch_size=4)
    ce, hits, n, exact = 0.0, 0, 0, 0
    with torch.no_grad():
        for ex in examples:
            prompt, answer = tasks.split_continuation(tokenizer, ex["prompt"], ex["answer"])
            target = (answer + [tokenizer.eos_token_id])[:BS]
            clean = torch.tensor([prompt + target + [0] * (BS - len(target))])
            noisy = torch.tensor([prompt + [MASK] * BS])
            logits = model(clean, noisy)[0, len(prompt) : len(prompt) + len(target)].float()
            logits[:, MASK] = -torch.inf
            logp = logits.log_softmax(-1)
            ce -= float(logp[range(len(target)), target].sum())
            right = logp.argmax(-1) == torch.tensor(target)
            hits, n, exact = hits + int(right.sum()), n + len(target), exact + int(right.all())
    assert got["answer_ce"] == pytest.approx(ce / n, rel=1e-4)
    assert got["answer_acc"] == hits / n and got["answer_exact"] == exact / len(examples)
    assert answer_block_metrics(model, tokenizer, examples, batch_size=1) == pytest.approx(got)


# -- AR agreement ---------------------------------------------------------------------------------


def test_agreement_counts_positions_of_the_reference():
    from twotower_train.eval.agreement import agreement

    ref = [[1, 2, 3, 4], [5, 6]]
    assert agreement(ref, ref) == (6, 6)
    # a mismatch, a shorter output (the rest disagrees), a longer one (extra ignored)
    assert agreement(ref, [[1, 9, 3], [5, 6, 7, 8]]) == (4, 6)
    assert agreement([list(range(100))], [list(range(100))], length=64) == (64, 64)
    with pytest.raises(ValueError):
        agreement(ref, [[1]])


def test_agreement_prompts_and_bad_data(tmp_path, tokenizer):
    from twotower_train.eval.agreement import AgreementDataError, agreement_prompts, load_passages

    path = tmp_path / "heldout.jsonl"
    path.write_text('{"text": "a b"}\n' + '{"text": "' + "add 1 2 = 3 " * 20 + '"}\n\n')
    passages = load_passages(str(path))
    prompts = agreement_prompts(passages, tokenizer, prompt_tokens=8, limit=5)
    assert len(prompts) == 1 and len(prompts[0]) == 8  # the short passage is skipped
    path.write_text('{"text": "fine"}\n["not", "an", "object"]\n')
    with pytest.raises(AgreementDataError, match="line 2"):
        load_passages(str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_passages(str(tmp_path / "nope.jsonl"))
    with pytest.raises(AgreementDataError, match="longer than 500 tokens"):
        agreement_prompts(["short"], tokenizer, prompt_tokens=500, limit=3)


def test_ar_agreement_in_the_report(model, tokenizer, tmp_path):
    """ar_agreement: reported beside the summary, not in it; verified agrees exactly."""
    cfg = EvalConfig(
        tasks=["add", "ar_agreement"],
        max_examples_per_task=3,
        max_new_tokens=6,
        threshold_sweep=[],
        speed_examples=0,
        batch_size=8,
        verify=True,
        agreement_prompt_tokens=12,
    )
    report = evaluate(model, tokenizer, cfg, tmp_path)
    row = next(t for t in report["tasks"] if t["name"] == "ar_agreement")
    assert row["backbone"] == 1.0 and 0.0 <= row["twotower"] <= 1.0
    assert row["in_retained"] is False and report["retained_tasks"] == ["add"]
    agree = report["ar_agreement"]
    assert agree["prompts"] == 3 and agree["verified"]["agreement"] == 1.0
    assert agree["diffusion"]["positions"] == agree["verified"]["positions"] > 0
    assert agree["diffusion"]["agreement"] == row["twotower"]
    assert "AR agreement" in (tmp_path / "report.md").read_text()


def test_agreement_alone_gives_speed_and_verified_figures(model, tokenizer, tmp_path):
    """A suite without generation tasks (real benchmarks are log-likelihood): tokens per
    forward, speed and the verified mode come from the held-out agreement prompts."""
    cfg = EvalConfig(
        tasks=["tiny_world_mc", "ar_agreement"],
        max_examples_per_task=2,
        threshold_sweep=[],
        speed_examples=2,
        batch_size=8,
        verify=True,
        agreement_prompt_tokens=12,
    )
    report = evaluate(model, tokenizer, cfg, tmp_path)
    assert report["tokens_per_forward"] == report["ar_agreement"]["diffusion"]["tokens_per_forward"]
    assert report["speedup_vs_ar"] > 0 and report["speed"]["examples"] == 2
    verified = report["verified"]
    assert verified["retained"] == 1.0 and verified["tokens_per_step"] >= 1.0
    assert verified["speedup_vs_ar"] > 0
    assert "not in the summary ratios" in (tmp_path / "report.md").read_text()
