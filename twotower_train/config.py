"""Typed configuration schema and Hydra composition.

Every key a run can take is declared here as a dataclass field. Hydra composes
`conf/config.yaml`, the config groups under `conf/` and the recipe picked by
`recipe=NAME` (`recipes/NAME.yaml`) or `recipe=PATH.yaml`; the result is merged into this
schema, so an unknown key or a badly typed value is refused before any work starts.

`conf/` and `recipes/` ship inside the package. Two environment variables extend them
(os.pathsep-separated folders, searched before the shipped ones):

* ``TWOTOWER_RECIPE_PATH``: folders of recipes, ``NAME.yaml`` each;
* ``TWOTOWER_CONFIG_PATH``: Hydra config folders, ``GROUP/OPTION.yaml`` each (e.g.
  ``backbone/mine.yaml``, picked with ``backbone=mine``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from twotower_train.errors import TwoTowerError, first_line
from twotower_train.model.config import DType, TwoTowerConfig

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR / "conf"  # shipped Hydra config groups (package data)
RECIPES_DIR = PACKAGE_DIR / "recipes"  # shipped recipes (package data)
DEFAULT_RECIPE = "tiny"
RECIPE_PATH_ENV = "TWOTOWER_RECIPE_PATH"
CONFIG_PATH_ENV = "TWOTOWER_CONFIG_PATH"
RECIPE_SUFFIXES = (".yaml", ".yml")


class ConfigError(TwoTowerError, ValueError):
    """A configuration the run cannot start with; the message is one line."""


class Mode(str, Enum):
    train = "train"
    eval = "eval"
    release = "release"  # export run.dir's latest checkpoint (train.release_from_checkpoint)
    plan = "plan"  # parameters and per-GPU memory on the meta device, no weights (plan.py)


class Objective(str, Enum):
    ar = "ar"  # next-token cross-entropy: pretraining a backbone
    twotower = "twotower"  # block diffusion + AR distillation


class LMHead(str, Enum):
    rows = "rows"  # the LM head on the scored rows only, in chunks (no [B, L, V] logits)
    full = "full"  # full [B, L, V] fp32 logits of both towers (the reference)


class InitMode(str, Enum):
    pretrained = "pretrained"  # load weights (shipped name, local path or hub id)
    scratch = "scratch"  # build from `backbone.config` with fresh weights


class LRSchedule(str, Enum):
    cosine = "cosine"
    wsd = "wsd"  # warmup, stable, decay
    constant = "constant"


class LoggerBackend(str, Enum):
    none = "none"
    wandb = "wandb"


class WandbMode(str, Enum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


class ResumeMode(str, Enum):
    # Resume from run.dir's latest checkpoint when the saved config trains the same way;
    # refuse (listing the keys) when a key that changes training differs.
    auto = "auto"
    # Resume from the latest checkpoint even though training keys changed (the new config is
    # saved; the old one is kept as config.before_<time>.yaml).
    changed = "changed"
    # Start over: the old run's config, metrics and checkpoints move to run.dir/previous/<time>/.
    restart = "restart"


@dataclass
class RunConfig:
    dir: str = "runs/${recipe}"  # one fixed directory every rank agrees on
    seed: int = 1234
    resume: ResumeMode = ResumeMode.auto
    # How long a rank waits for the others in a collective (rank 0's evaluation, export and
    # upload included) before the process group gives up.
    dist_timeout_s: int = 1800


@dataclass
class BackboneConfig:
    # A shipped name (tiny_llama, tiny_nemotron_h), a local folder, a hub id, or a .gguf
    # file (dequantized once into the cache: docs/recipes.md "GGUF backbones").
    name_or_path: str = "tiny_llama"
    # A .gguf file inside the folder `name_or_path` (null: a folder is an HF model folder).
    gguf_file: str | None = None
    revision: str | None = None
    init: InitMode = InitMode.pretrained
    # HF config kwargs (with `model_type`) for init=scratch.
    config: dict[str, Any] = field(default_factory=dict)
    # Tokenizer folder / hub id; null = same as name_or_path (tiny world's for scratch).
    tokenizer: str | None = None


class DataSource(str, Enum):
    tiny_world = "tiny_world"  # the shipped corpus (no `data.sources`)
    mixture = "mixture"  # the list `data.sources`, mixed by weight


class SourceKind(str, Enum):
    tiny_world = "tiny_world"  # the shipped corpus as one entry of a mixture
    hub = "hub"  # `datasets` hub id, or a local folder (load_dataset / save_to_disk)
    text = "text"  # plain text files
    jsonl = "jsonl"  # one JSON object per line (.jsonl, .jsonl.gz)
    parquet = "parquet"


class TextUnit(str, Enum):
    paragraph = "paragraph"  # blank-line separated
    line = "line"
    file = "file"


class BadDocumentPolicy(str, Enum):
    error = "error"  # stop with file:line
    skip = "skip"  # skip it, counted in the log


@dataclass
class DataSourceConfig:
    kind: SourceKind = SourceKind.jsonl
    # File, folder or glob (text/jsonl/parquet); hub id or local dataset folder (hub).
    path: str = ""
    name: str | None = None  # hub: dataset config name
    split: str = "train"  # hub: split
    revision: str | None = None  # hub: branch, tag or commit
    field: str = "text"  # jsonl/parquet/hub: the column holding the document
    # SFT: both set = prompt + completion per record; prompt tokens carry no loss.
    prompt_field: str | None = None
    completion_field: str | None = None
    weight: float = 1.0  # share of training tokens (normalised over sources)
    text_unit: TextUnit = TextUnit.paragraph  # text: what one document is

    def __post_init__(self) -> None:
        self.kind, self.text_unit = SourceKind(self.kind), TextUnit(self.text_unit)
        if self.weight <= 0:
            raise ConfigError(f"data.sources: weight must be > 0, got {self.weight}")
        if (self.prompt_field is None) != (self.completion_field is None):
            raise ConfigError(
                "data.sources: set both prompt_field and completion_field, or neither"
            )
        if self.kind == SourceKind.text and self.prompt_field is not None:
            raise ConfigError("data.sources: kind=text has no fields; SFT needs jsonl/parquet/hub")
        if self.kind != SourceKind.tiny_world and not self.path:
            raise ConfigError(f"data.sources: kind={self.kind.value} needs a path")


@dataclass
class DataConfig:
    # `tiny_world`: the shipped corpus; `mixture`: `sources` below. See docs/data.md.
    source: DataSource = DataSource.tiny_world
    sources: list[DataSourceConfig] = field(default_factory=list)
    seq_len: int = 256  # a multiple of denoiser.block_size
    # Held-out sequences for the validation loss (0 = none); for `mixture`, the first
    # documents of each source (by weight), never trained on.
    val_sequences: int = 64
    # Read and tokenise while training (no cache) instead of tokenising once into a cache.
    streaming: bool = False
    # Streaming: documents are shuffled within windows of this many.
    shuffle_window: int = 8192
    # No attention across document boundaries in either tower.
    doc_mask: bool = True
    on_bad_document: BadDocumentPolicy = BadDocumentPolicy.error
    # Documents with fewer tokens are bad documents (e.g. denoiser.block_size).
    min_doc_tokens: int = 1
    # Tokenised-data cache; null = $TWOTOWER_CACHE or ~/.cache/twotower_train.
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        self.source = DataSource(self.source)
        self.on_bad_document = BadDocumentPolicy(self.on_bad_document)
        if self.source == DataSource.mixture and not self.sources:
            raise ConfigError("data.source=mixture needs at least one entry in data.sources")
        if self.source == DataSource.tiny_world and self.sources:
            raise ConfigError(
                "data.sources is set but data.source=tiny_world; set data.source=mixture"
            )
        if self.val_sequences < 0 or self.min_doc_tokens < 0 or self.shuffle_window < 1:
            raise ConfigError(
                "data.val_sequences and data.min_doc_tokens must be >= 0, data.shuffle_window >= 1"
            )


class NoiseSchedule(str, Enum):
    linear = "linear"
    cosine = "cosine"


class TimePer(str, Enum):
    example = "example"
    block = "block"


class CEWeighting(str, Enum):
    none = "none"  # mean CE over masked tokens (as the 30B release trains)
    elbo = "elbo"  # MDLM 1/t weight: a bound on the NLL


class KDDirection(str, Enum):
    forward = "forward"  # KL(teacher || student)
    reverse = "reverse"  # KL(student || teacher)


class KDTimeWeighting(str, Enum):
    none = "none"
    t = "t"
    one_minus_t = "1-t"


class AfterEOS(str, Enum):
    """What the loss does with positions after an EOS inside the same noisy block: their
    clean tokens belong to the next document, which the block cannot know (decoding
    discards what follows an EOS)."""

    ignore = "ignore"  # noised like the rest, left out of the loss
    eos = "eos"  # the block reads EOS there (input and target), as a finished answer pads
    keep = "keep"  # predict the next document's tokens anyway


@dataclass
class DiffusionConfig:
    schedule: NoiseSchedule = NoiseSchedule.linear
    t_per: TimePer = TimePer.block
    eps: float = 1e-3
    antithetic: bool = True
    mask_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    weighting: CEWeighting = CEWeighting.none
    # With document masking (data.doc_mask): positions after an in-block EOS.
    after_eos: AfterEOS = AfterEOS.ignore
    # Share of blocks masked as a suffix (the last k maskable positions, k drawn as usual):
    # the pattern left-to-right ("prefix") decoding shows the denoiser. 0 = independent.
    suffix_prob: float = 0.0
    # A second denoiser pass on the complement of each block's mask (the context tower's
    # pass is shared): every maskable token is supervised once per step.
    complementary: bool = False
    # Block-size curriculum: warm-up block sizes trained before denoiser.block_size, each
    # stage an equal share of the steps: [4, 8] = 4, 8, then the block size (thirds). An
    # entry above the block size is capped at it. [] = off.
    block_curriculum: list[int] = field(default_factory=list)


@dataclass
class DistillConfig:
    weight: float = 0.0  # total = CE + weight x KD
    temperature: float = 1.0
    direction: KDDirection = KDDirection.forward
    t_weighting: KDTimeWeighting = KDTimeWeighting.none


@dataclass
class TrainConfig:
    objective: Objective = Objective.ar
    steps: int = 100
    micro_batch_size: int = 8
    # Leave one of these null to derive it: micro x accum x world = global.
    grad_accum_steps: int | None = 1
    global_batch_size: int | None = None
    log_every: int = 10
    ckpt_every: int = 100
    keep_last: int = 2
    eval_every: int = 0  # 0 = evaluate only at the end
    eval_at_end: bool = True
    # Stop after this many steps of this invocation (testing preemption); 0 = off.
    stop_after: int = 0
    # Wall-clock budget in seconds (0 = none): when spent, the run ends at that step as if
    # it were the last one (final checkpoint, evaluation, export), LR schedule unfinished.
    time_limit_s: float = 0.0
    # Recompute each denoiser layer's activations in the backward (torch.utils.checkpoint,
    # non-reentrant): less activation memory for about one more denoiser forward per step.
    activation_checkpointing: bool = False
    # Peak dense TFLOP/s of one device for `mfu` (null = a table of known GPUs; on CPU a
    # matmul rate measured at start in precision.dtype).
    peak_tflops: float | None = None
    # Where the losses read logits: `rows` runs the LM head only on the positions a loss
    # scores (and the teacher rows KD reads), lm_head_chunk rows at a time with the chunk's
    # logits recomputed in the backward; `full` materialises [B, L, V] for both towers.
    lm_head: LMHead = LMHead.rows
    lm_head_chunk: int = 0  # rows per chunk; 0 = as many as fit 256 MiB of fp32 logits


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 10
    schedule: LRSchedule = LRSchedule.cosine
    decay_fraction: float = 0.2  # WSD: share of steps spent decaying
    grad_clip: float = 1.0  # 0 = no clipping


class ContextPlacement(str, Enum):
    shard = "shard"  # ZeRO-3 partitions the frozen context tower with the denoiser
    replicate = "replicate"  # every rank holds it whole (bf16 with precision=bf16): no gathers


@dataclass
class DeepSpeedConfig:
    stage: int = 0
    offload_optimizer: bool = False
    overlap_comm: bool = False
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000
    # The frozen context tower under ZeRO-3 (stages 0-2 always replicate parameters).
    context_placement: ContextPlacement = ContextPlacement.shard
    # ZeRO-3 gathers (DeepSpeed's stage3_* keys, its defaults): at most this many gathered
    # parameters stay alive; one used again within max_reuse_distance gathered parameters
    # is kept; the prefetch bucket. Lower them to trade re-gathers for memory.
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 1_000_000_000
    prefetch_bucket_size: int = 50_000_000
    # ZeRO-3: build the model partitioned (deepspeed.zero.Init; engine/zero_init.py), so no
    # process ever holds it whole; false builds it whole first (stages 0-2 always do).
    zero_init: bool = True


class PlanDevice(str, Enum):
    cuda = "cuda"  # GPU memory: the run's host-side copies are not counted
    cpu = "cpu"  # CPU processes: the fp32 template copy a run keeps counts too


@dataclass
class PlanConfig:
    """``mode=plan`` (twotower_train/plan.py): the world the memory estimate is for."""

    gpus: int = 8  # data-parallel ranks (GPUs, or processes on CPU) ZeRO shards over
    gpu_memory_gib: float = 80.0  # per-device memory the "fits" column compares with
    device: PlanDevice = PlanDevice.cuda


class PrecisionBackend(str, Enum):
    torch = "torch"  # torch nn.Linear (DeepSpeed bf16 or fp32)
    te = "te"  # Transformer Engine te.Linear in the denoiser (CUDA; bf16, or FP8 with fp8=true)
    torchao = "torchao"  # torchao float8 training (convert_to_float8_training; CUDA, fp8=true)


class FP8Recipe(str, Enum):
    current = "current"  # per-tensor current scaling: stateless, exact when a tower reruns
    delayed = "delayed"  # delayed scaling from an amax history (te only)
    mxfp8 = "mxfp8"  # MXFP8 block scaling (te only; Blackwell)


class CpuBf16(str, Enum):
    # bf16 on a CPU without native bf16 matmuls (AVX-512 BF16 or AMX) runs a scalar
    # fallback 10-30x slower than fp32: there `auto` trains in fp32 and says so at start.
    auto = "auto"
    on = "on"  # bf16 wherever asked, however slow


@dataclass
class PrecisionConfig:
    # Parameter / compute dtype of the engine: bf16 (fp32 master weights) or fp32.
    dtype: DType = DType.bf16
    # What precision.dtype=bf16 means on a CPU that has no native bf16 matmuls.
    cpu_bf16: CpuBf16 = CpuBf16.auto
    # Which linear layers the denoiser runs (docs/training.md, "Precision").
    backend: PrecisionBackend = PrecisionBackend.torch
    # FP8 matmuls in the denoiser's linears (backend te or torchao); refused where the GPU
    # or the library cannot do it, never a silent fallback.
    fp8: bool = False
    # FP8 scaling recipe (te: current, delayed, mxfp8; torchao: current = tensorwise).
    recipe: FP8Recipe = FP8Recipe.current
    # Delayed scaling only: amax history length and how a scale is read from it.
    amax_history_len: int = 16
    amax_compute_algo: str = "max"  # max | most_recent
    # Also run the frozen context tower's linears in FP8 (te, inference only; stateless
    # recipe whatever `recipe` says, so the no-grad tower keeps no amax history).
    context_fp8: bool = False


@dataclass
class LoggerConfig:
    backend: LoggerBackend = LoggerBackend.none
    project: str = "twotower_train"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: WandbMode = WandbMode.offline


@dataclass
class SlurmConfig:
    """Under Slurm (docs/slurm.md): a time-limit warning (SIGUSR1) checkpoints and requeues
    the job; a preempted job (SIGTERM) checkpoints and Slurm requeues it."""

    # Most requeues of one job (SLURM_RESTART_COUNT, whoever requeued it): at the limit the
    # run checkpoints without requeueing, and a job brought back past it does not start.
    # 0 = never requeue.
    max_requeues: int = 20


class CommitOrder(str, Enum):
    prefix = "prefix"
    any = "any"


class CommitScore(str, Enum):
    confidence = "confidence"
    margin = "margin"


@dataclass
class EvalConfig:
    """Retained-performance evaluation (twotower_train/eval/harness.py, docs/evaluation.md)."""

    tasks: list[str] = field(
        default_factory=lambda: [
            "add",
            "copy",
            "reverse",
            "sort",
            "recall",
            "perplexity",
            "tiny_world_mc",
        ]
    )
    max_examples_per_task: int = 200  # also the number of perplexity rows
    threshold: float = 0.95  # main confidence threshold of diffusion decoding
    # What the threshold reads (generate.DecodeConfig): the chosen token's probability, or
    # its margin over the runner-up.
    score: CommitScore = CommitScore.confidence
    # Adjacent masked positions commit together only if both scores reach this (null = off).
    adjacent_threshold: float | None = None
    # Which positions may commit: `prefix` = a contiguous run from the first masked one
    # (left to right, the default: docs/evaluation.md), `any` = wherever the score allows.
    order: CommitOrder = CommitOrder.prefix
    steps_per_block: int | None = None  # null = block size
    max_new_tokens: int = 24
    threshold_sweep: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.8, 0.9, 0.95])
    elbo_samples: int = 4
    seed: int = 0
    batch_size: int = 32
    speed_examples: int = 32  # prompts decoded at batch 1 for tokens/s (0 = skip)
    perplexity_seq_len: int = 128  # rounded up to a multiple of the block size
    elbo_schedule: NoiseSchedule = NoiseSchedule.linear  # noise schedule of the ELBO draws
    # Also score verified decoding (the context tower checks every drafted block; lossless):
    # report.json `verified`.
    verify: bool = False
    # Drafting threshold of the verified mode (null = `threshold`): only a speed knob, the
    # output is the backbone's whatever the draft; low drafts more per round.
    verify_threshold: float | None = 0.5
    # ar_agreement: held-out passages (jsonl of {"text": ...}; null = the tiny world's), the
    # prompt length in tokens; the first 64 generated tokens are compared with AR greedy.
    agreement_data: str | None = None
    agreement_prompt_tokens: int = 32
    # mode=eval: the release folder to score (null = run.dir/release; `untrained` = the
    # run's backbone with a fresh copy as denoiser: the baseline before training).
    release: str | None = None
    # mode=eval: where the release is scored (null = cuda when available, else cpu; or a torch
    # device: cpu, cuda, cuda:1, mps) and the precision its weights load in. Evaluation at the
    # end of training scores the trained model where and as it trained.
    device: str | None = None
    dtype: DType = DType.fp32

    def __post_init__(self) -> None:
        from twotower_train.devices import parse_device

        self.dtype = DType(self.dtype)
        try:
            parse_device(self.device)  # the spelling now; whether the machine has it: at use
        except ValueError as exc:
            raise ConfigError(f"eval.{exc}") from None


class ReleaseBackbone(str, Enum):
    bundle = "bundle"  # the frozen backbone stored in release/backbone/ (self-contained)
    reference = "reference"  # name, revision and sha256 only; loading finds and checks it


@dataclass
class ExportConfig:
    # AR objective: write the trained HF model (safetensors + tokenizer) to run.dir/hf.
    hf: bool = False
    # Two-tower objective: write the released model folder to run.dir/release.
    release: bool = True
    # Stored weights: bf16 (the default, as HF releases are) or fp32 (exact).
    dtype: DType = DType.bf16
    backbone: ReleaseBackbone = ReleaseBackbone.bundle
    # Weights larger than this are split into shards (HF's index layout): bytes or "5GB".
    max_shard_size: str = "5GB"
    # Upload the finished folder to this Hugging Face repo id (huggingface_hub; needs a
    # token and network): null = do not publish.
    push_to_hub: str | None = None
    hub_private: bool = True


@dataclass
class Config:
    recipe: str = DEFAULT_RECIPE
    mode: Mode = Mode.train
    run: RunConfig = field(default_factory=RunConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # The two-tower model's settings (the same object from_backbone and releases use).
    denoiser: TwoTowerConfig = field(default_factory=TwoTowerConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


def _one_line(exc: BaseException) -> str:
    """``first_line`` plus the key OmegaConf names on a later line, and the cause of a
    Hydra override error."""
    if str(exc).startswith("Error merging override") and exc.__cause__ is not None:
        return f"{str(exc).strip()}: {_one_line(exc.__cause__)}"
    head = first_line(exc)
    # OmegaConf appends "full_key: ..., object_type=..." on later lines; Hydra adds hints.
    for ln in str(exc).splitlines()[1:]:
        if ln.strip().startswith("full_key:"):
            return f"{head} ({ln.strip().split(',')[0]})"
    return head


def _register_asset_resolver() -> None:
    """``${asset:NAME}``: the folder of a fetched asset (``twotower_train/assets.py``)."""
    from twotower_train.assets import asset_resolver

    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", asset_resolver)


_register_asset_resolver()


def compose(overrides: list[str]) -> Config:
    """Compose `conf/` + recipe + command-line overrides into a validated Config (the
    search paths: module docstring)."""
    raw, recipe = _compose_raw(overrides)
    return validate(raw, recipe)


def hydra_section(overrides: list[str]) -> dict:
    """The ``hydra:`` section Hydra composes for these overrides (``--cfg all``), unresolved."""
    raw, _ = _compose_raw(overrides, return_hydra_config=True)
    return OmegaConf.to_container(raw.hydra, resolve=False)


def _compose_raw(overrides: list[str], return_hydra_config: bool = False):
    """Hydra's composition of `conf/config.yaml` + the recipe + ``overrides`` (not yet
    validated) and the recipe's name; Hydra's errors become one-line ``ConfigError``s."""
    from hydra import compose as hydra_compose
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra

    value = DEFAULT_RECIPE
    for ov in overrides:
        if ov.startswith("recipe="):
            value = ov.split("=", 1)[1]
    recipe, path = resolve_recipe(value)
    overrides = [f"recipe={recipe}", *(ov for ov in overrides if not ov.startswith("recipe="))]
    # Recipes live in folders of their own, not under a config folder: Hydra gets them as
    # the options of the `recipe` group in its config store (a recipe's defaults list may
    # name another recipe), the chosen one under its name whatever its folder.
    store = ConfigStore.instance()
    store.store(name="schema", node=Config)
    store.repo.pop("recipe", None)
    for other, other_path in known_recipes().items():
        if other != recipe:
            try:
                node = _load_recipe(other_path)
            except ConfigError:  # unreadable: an error only where a recipe names it
                continue
            store.store(group="recipe", name=other, node=node, package=_package(other_path))
    store.store(group="recipe", name=recipe, node=_load_recipe(path), package=_package(path))
    # The user's config folders go before the shipped conf/ (first match wins), which
    # hydra.searchpath cannot do: it appends.
    search_path = create_config_search_path(str(CONF_DIR))
    for folder in env_folders(CONFIG_PATH_ENV, check=True):
        search_path.prepend(CONFIG_PATH_ENV, f"file://{folder}", anchor="main")
    GlobalHydra.instance().clear()
    try:
        version.setbase("1.3")
        Hydra.create_main_hydra2(task_name="app", config_search_path=search_path)
        raw = hydra_compose(
            config_name="config",
            overrides=list(overrides),
            return_hydra_config=return_hydra_config,
        )
    except Exception as exc:  # Hydra's override / missing-group errors
        msg = _one_line(exc)
        m = re.match(r"Could not override '([^']+)'", msg)
        if m:
            msg = f"unknown config key '{m.group(1)}' (every key is declared in {__name__})"
        raise ConfigError(msg) from None
    finally:
        GlobalHydra.instance().clear()
    return raw, recipe


def env_folders(var: str, check: bool = False) -> list[Path]:
    """The folders the environment variable ``var`` lists (os.pathsep-separated, ``~``
    expanded, relative to the working directory). ``check``: refuse one that is not a folder,
    so a typo does not quietly fall back to the shipped configs."""
    folders = []
    for entry in os.environ.get(var, "").split(os.pathsep):
        if not entry.strip():
            continue
        folder = Path(entry).expanduser().absolute()
        if check and not folder.is_dir():
            raise ConfigError(f"{var}: {entry} is not a folder")
        folders.append(folder)
    return folders


def recipe_dirs() -> list[Path]:
    """Where ``recipe=NAME`` looks for ``NAME.yaml``, first match wins:
    ``TWOTOWER_RECIPE_PATH``'s folders, then the shipped recipes."""
    return [*env_folders(RECIPE_PATH_ENV, check=True), RECIPES_DIR]


def config_dirs() -> list[Path]:
    """Hydra's config folders, first match wins: ``TWOTOWER_CONFIG_PATH``'s folders, then the
    shipped ``conf/``."""
    return [*env_folders(CONFIG_PATH_ENV, check=True), CONF_DIR]


def known_recipes() -> dict[str, Path]:
    """Every name ``recipe=NAME`` takes, sorted, with the file it picks."""
    found: dict[str, Path] = {}
    for folder in recipe_dirs():
        for path in sorted(folder.glob("*.yaml")):
            found.setdefault(path.stem, path)
    return dict(sorted(found.items()))


def resolve_recipe(value: str) -> tuple[str, Path]:
    """What ``recipe=VALUE`` picks, as (name, file). A value ending in .yaml/.yml or holding
    a path separator is a file (relative to the working directory), named by its stem;
    anything else is a name looked up in ``recipe_dirs()``."""
    if value.endswith(RECIPE_SUFFIXES) or "/" in value or os.sep in value:
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {value}")
        name = path.stem
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
            raise ConfigError(
                f"recipe file {value}: its name '{name}' names the run (runs/{name}): use "
                "letters, digits, '_', '.' and '-'"
            )
        return name, path.absolute()
    recipes = known_recipes()
    if value not in recipes:
        known = ", ".join(recipes)
        raise ConfigError(f"unknown recipe '{value}' (known: {known}; or recipe=PATH.yaml)")
    return value, recipes[value]


def _load_recipe(path: Path) -> DictConfig:
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # YAML syntax
        raise ConfigError(f"recipe {path}: {_one_line(exc)}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"recipe {path}: expected a mapping of keys, got a list")
    return node


def _package(path: Path) -> str | None:
    """The ``# @package X`` of a config file's header comment, as Hydra reads it."""
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            break
        m = re.match(r"#\s*@package\s+(\S+)", line)
        if m:
            return m.group(1)
    return None


def validate(raw: DictConfig, recipe: str) -> Config:
    """Merge a composed config into the schema; refuse unknown keys and bad values."""
    OmegaConf.set_struct(raw, False)
    raw.pop("hydra", None)
    raw["recipe"] = recipe
    _refuse_unknown_keys(OmegaConf.to_container(raw, resolve=False), Config, "")
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, raw)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except Exception as exc:
        raise ConfigError(_one_line(exc)) from None
    check(cfg)
    return cfg


def _refuse_unknown_keys(node: Any, schema: type, prefix: str) -> None:
    """`+key=value` can add keys Hydra's struct mode lets through; the schema cannot."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in node.items():
        if key not in fields:
            raise ConfigError(
                f"unknown config key '{prefix}{key}' (every key is declared in {__name__})"
            )
        sub = fields[key].type
        sub = globals().get(sub, sub) if isinstance(sub, str) else sub
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            _refuse_unknown_keys(value, sub, f"{prefix}{key}.")


def check(cfg: Config) -> None:
    """Value checks the type system cannot express."""
    t = cfg.train
    if cfg.deepspeed.stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.stage must be 0, 1, 2 or 3, got {cfg.deepspeed.stage}")
    for key in ("max_live_parameters", "max_reuse_distance", "prefetch_bucket_size"):
        if getattr(cfg.deepspeed, key) < 0:
            raise ConfigError(f"deepspeed.{key} must be >= 0, got {getattr(cfg.deepspeed, key)}")
    if cfg.deepspeed.stage == 3 and cfg.deepspeed.zero_init:
        if cfg.precision.backend != PrecisionBackend.torch:
            raise ConfigError(
                f"precision.backend={cfg.precision.backend.value} swaps linear layers of a "
                "whole model: with deepspeed=zero3 set deepspeed.zero_init=false"
            )
        ctx = cfg.denoiser.context_dtype
        if ctx is not None and ctx != cfg.precision.dtype:
            raise ConfigError(
                f"denoiser.context_dtype={ctx.value} differs from precision.dtype="
                f"{cfg.precision.dtype.value}: a partitioned model has one dtype "
                "(deepspeed.zero_init=false builds it whole)"
            )
    if cfg.plan.gpus < 1 or cfg.plan.gpu_memory_gib <= 0:
        raise ConfigError(
            f"plan.gpus must be >= 1 and plan.gpu_memory_gib > 0, got {cfg.plan.gpus} and "
            f"{cfg.plan.gpu_memory_gib}"
        )
    for name in ("steps", "micro_batch_size", "log_every", "ckpt_every", "keep_last"):
        if getattr(t, name) <= 0:
            raise ConfigError(f"train.{name} must be > 0, got {getattr(t, name)}")
    if cfg.slurm.max_requeues < 0:
        raise ConfigError(f"slurm.max_requeues must be >= 0, got {cfg.slurm.max_requeues}")
    if cfg.data.seq_len < 2:
        raise ConfigError(f"data.seq_len must be >= 2, got {cfg.data.seq_len}")
    if not re.fullmatch(r"\d+|\d+(\.\d+)?\s*[KMGT]B", str(cfg.export.max_shard_size).strip()):
        raise ConfigError(
            f"export.max_shard_size must be bytes or a size such as '5GB', "
            f"got {cfg.export.max_shard_size!r}"
        )
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {cfg.optim.lr}")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {cfg.optim.min_lr_ratio}")
    d = cfg.denoiser
    if d.block_size < 1 or cfg.data.seq_len % d.block_size:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} must be a multiple of denoiser.block_size={d.block_size}"
        )
    try:
        d.validate()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    lo_hi = cfg.diffusion.mask_range
    if len(lo_hi) != 2 or not 0.0 <= lo_hi[0] < lo_hi[1] <= 1.0:
        raise ConfigError(
            f"diffusion.mask_range must be [lo, hi] with 0 <= lo < hi <= 1, got {lo_hi}"
        )
    if not 0.0 <= cfg.diffusion.suffix_prob <= 1.0:
        raise ConfigError(
            f"diffusion.suffix_prob must be in [0, 1], got {cfg.diffusion.suffix_prob}"
        )
    cur = cfg.diffusion.block_curriculum
    if any(b < 1 or cfg.data.seq_len % min(b, d.block_size) for b in cur):
        raise ConfigError(
            f"diffusion.block_curriculum={list(cur)}: every block size must be >= 1 and "
            f"divide data.seq_len={cfg.data.seq_len}"
        )
    if cfg.diffusion.complementary and cfg.diffusion.weighting == CEWeighting.elbo:
        raise ConfigError(
            "diffusion.complementary=true needs diffusion.weighting=none (the complement's "
            "noise level has no time of its own for the ELBO weight)"
        )
    if not 0.0 < cfg.diffusion.eps < 1.0:
        raise ConfigError(f"diffusion.eps must be in (0, 1), got {cfg.diffusion.eps}")
    if cfg.distill.weight < 0 or cfg.distill.temperature <= 0:
        raise ConfigError("distill.weight must be >= 0 and distill.temperature > 0")
    if cfg.backbone.init == InitMode.scratch and "model_type" not in cfg.backbone.config:
        raise ConfigError("backbone.init=scratch needs backbone.config.model_type")
    if cfg.run.dist_timeout_s <= 0:
        raise ConfigError(f"run.dist_timeout_s must be > 0, got {cfg.run.dist_timeout_s}")
    check_eval(cfg.eval)
    check_precision(cfg.precision, cfg.train)


def check_eval(e: EvalConfig) -> None:
    """Evaluation settings, checked before training starts (the task names are checked by
    the run, which knows the task registry: ``run/preflight.py``)."""
    for name in ("max_examples_per_task", "max_new_tokens", "batch_size", "elbo_samples"):
        if getattr(e, name) < 1:
            raise ConfigError(f"eval.{name} must be >= 1, got {getattr(e, name)}")
    if e.speed_examples < 0 or e.perplexity_seq_len < 1:
        raise ConfigError("eval.speed_examples must be >= 0 and eval.perplexity_seq_len >= 1")
    if e.steps_per_block is not None and e.steps_per_block < 1:
        raise ConfigError(f"eval.steps_per_block must be >= 1, got {e.steps_per_block}")
    named = {"threshold": e.threshold, "verify_threshold": e.verify_threshold}
    named.update({f"threshold_sweep[{i}]": v for i, v in enumerate(e.threshold_sweep)})
    if e.adjacent_threshold is not None:
        named["adjacent_threshold"] = e.adjacent_threshold
    for key, value in named.items():
        if value is not None and not 0.0 <= value <= 1.0:
            raise ConfigError(f"eval.{key} must be in [0, 1], got {value}")
    if len(set(e.tasks)) != len(e.tasks):
        raise ConfigError(f"eval.tasks names a task twice: {list(e.tasks)}")


def check_precision(p: PrecisionConfig, t: TrainConfig) -> None:
    """Combinations of precision keys no machine can run (the machine is checked at start,
    ``engine/precision.py``)."""
    if p.fp8 and p.backend == PrecisionBackend.torch:
        raise ConfigError("precision.fp8=true needs precision.backend=te or torchao")
    if p.backend == PrecisionBackend.torchao and not p.fp8:
        raise ConfigError("precision.backend=torchao is float8 training: set precision.fp8=true")
    if p.backend == PrecisionBackend.torchao and p.recipe != FP8Recipe.current:
        raise ConfigError(
            f"precision.recipe={p.recipe.value} is a Transformer Engine recipe; torchao runs "
            "recipe=current (tensorwise scaling)"
        )
    if p.context_fp8 and not (p.fp8 and p.backend == PrecisionBackend.te):
        raise ConfigError("precision.context_fp8=true needs precision.backend=te and fp8=true")
    if p.amax_compute_algo not in ("max", "most_recent") or p.amax_history_len < 1:
        raise ConfigError(
            "precision.amax_compute_algo must be max or most_recent and amax_history_len >= 1"
        )
    if p.fp8 and p.recipe == FP8Recipe.delayed and t.activation_checkpointing:
        raise ConfigError(
            "precision.recipe=delayed with train.activation_checkpointing: the recompute "
            "would update the amax history twice per step (use recipe=current)"
        )
    if t.peak_tflops is not None and t.peak_tflops <= 0:
        raise ConfigError(f"train.peak_tflops must be > 0, got {t.peak_tflops}")
    if t.lm_head_chunk < 0:
        raise ConfigError(f"train.lm_head_chunk must be >= 0, got {t.lm_head_chunk}")


def batch_arithmetic(train: TrainConfig, world_size: int) -> tuple[int, int]:
    """Return (grad_accum_steps, global_batch_size); refuse inconsistent settings."""
    micro, accum, glob = train.micro_batch_size, train.grad_accum_steps, train.global_batch_size
    per_accum = micro * world_size
    if accum is None and glob is None:
        accum = 1
    if accum is None:
        if glob % per_accum:
            raise ConfigError(
                f"train.global_batch_size={glob} is not divisible by micro_batch_size x world "
                f"= {micro} x {world_size} = {per_accum}"
            )
        accum = glob // per_accum
    if accum <= 0:
        raise ConfigError(f"train.grad_accum_steps must be > 0, got {accum}")
    if glob is not None and micro * accum * world_size != glob:
        raise ConfigError(
            f"batch sizes disagree: micro_batch_size x grad_accum_steps x world = {micro} x "
            f"{accum} x {world_size} = {micro * accum * world_size}, but "
            f"train.global_batch_size={glob} (set one of the two to null to derive it)"
        )
    return accum, micro * accum * world_size


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def fail(msg: str, code: int = 2) -> None:
    print(f"twotower_train: error: {msg}", file=sys.stderr)
    raise SystemExit(code)
