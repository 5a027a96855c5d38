"""The ``README.md`` model card of a release: what it is, the backbone it was trained from,
how it was trained, what the retained-performance harness measured, how to use it, its
limits and license. Written by ``release.save_release`` from the model and the run."""

from __future__ import annotations

import json
from pathlib import Path

from twotower_train.eval.report import interval_text


def model_card(model, backbone: dict, run_info: dict) -> str:
    """Markdown (with Hugging Face metadata front matter) for a release folder."""
    cfg = model.config
    name = backbone.get("name_or_path") or "unknown"
    run = run_info.get("config") or {}
    report = _read_report(run_info.get("report"))
    license_ = run_info.get("license") or "other"
    hf_type = model.backbone.config.model_type
    front = [
        "---",
        "library_name: twotower_train",
        f"base_model: {name}",
        f"license: {license_}",
        "tags: [block-diffusion, two-tower, diffusion-language-model, " + hf_type + "]",
        "---",
        "",
    ]
    n_trainable = sum(p.numel() for p in model.denoiser.parameters())
    n_frozen = sum(p.numel() for p in model.backbone.parameters())
    body = [
        f"# Two-tower block-diffusion model over `{name}`",
        "",
        "A **two-tower block-diffusion language model** trained with "
        "twotower_train from the autoregressive (AR) backbone "
        f"`{name}` (`{hf_type}`). The backbone is kept frozen as the **context tower**; a "
        "**denoiser tower** initialised from it fills a block of "
        f"{cfg.block_size} masked tokens at a time (mask token id {cfg.mask_token_id}), "
        "attending to the context tower's per-layer keys/values, so decoding commits "
        "several tokens per forward.",
        "",
        "| | |",
        "|---|---|",
        f"| block size | {cfg.block_size} |",
        f"| denoiser layers | {cfg.layers or 'all'} ({n_trainable / 1e6:.1f}M trained parameters) |",
        f"| context tower | the backbone, frozen ({n_frozen / 1e6:.1f}M parameters, "
        f"{cfg.context_dtype.value if cfg.context_dtype else 'its own dtype'}) |",
        f"| shifted predictions / time conditioning | {cfg.shift_logits} / {cfg.time_conditioning} |",
        "",
        "## Backbone",
        "",
        f"- reference: `{name}`"
        + (f" at revision `{backbone['revision']}`" if backbone.get("revision") else ""),
        (
            "- bundled in `backbone/`; loading checks each weight file against its sha256:"
            if backbone.get("bundled", True)
            else "- not bundled (a reference-only release): loading finds it (a local folder, "
            "or the hub) and refuses weight files whose sha256 differs from:"
        ),
        "",
        *[f"  - `{file}`: `{digest}`" for file, digest in (backbone.get("sha256") or {}).items()],
        "",
        "## Training",
        "",
        *_training(run, run_info),
        "",
        "## Results",
        "",
        *_results(report, run_info),
        "",
        "## Use",
        "",
        "```python",
        "from twotower_train.release import load_release",
        "from twotower_train.decoding import DecodeConfig, diffusion_generate",
        "",
        'model, tokenizer = load_release("PATH")',
        'prompt = tokenizer.encode("...")',
        "out, stats = diffusion_generate(model, [prompt], DecodeConfig(), tokenizer.eos_token_id)",
        "print(tokenizer.decode(out[0]), stats.tokens_per_forward)",
        "```",
        "",
        "```bash",
        'python -m twotower_train.generate PATH "a prompt"              # block diffusion',
        'python -m twotower_train.generate PATH --verify "a prompt"     # lossless: = AR greedy',
        "lm_eval --model twotower --model_args release=PATH,tower=twotower --tasks ...",
        "```",
        "",
        "Decoding defaults: threshold 0.95, left-to-right commits (`DecodeConfig`); "
        "`--verify` makes the context tower verify every drafted block, so the output is the "
        "backbone's greedy decoding token for token.",
        "",
        "## Limitations",
        "",
        "- It is only as good as its backbone, and keeps the share of the backbone's scores "
        "shown above on those tasks only; other tasks may lose more.",
        "- Confidence-threshold decoding trades quality for tokens per forward: lower "
        "thresholds are faster and less exact.",
        "- Speed gains need the denoiser to commit several tokens per forward; short "
        "answers and batch-1 prefill bound them.",
        "",
        "## License",
        "",
        f"Inherited from the backbone `{name}`: {license_}. The weights here are derived "
        "from it; its license and terms apply to this model.",
        "",
    ]
    return "\n".join(front + body)


def _read_report(path) -> dict | None:
    if not path or not Path(path).is_file():
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _training(run: dict, run_info: dict) -> list[str]:
    if not run:
        return ["Not recorded (the release was written outside a training run)."]
    train, data, optim = run.get("train", {}), run.get("data", {}), run.get("optim", {})
    diffusion = run.get("diffusion", {})
    batch = train.get("micro_batch_size", 0) * train.get("grad_accum_steps", 1)
    steps = run_info.get("steps") or train.get("steps")
    tokens = run_info.get("tokens")
    sources = data.get("sources") or [{"name": data.get("source", "?")}]
    lines = [
        f"- recipe: `{run.get('recipe')}`, seed {run.get('run', {}).get('seed')}",
        f"- data: {', '.join(str(s.get('name') or s.get('path') or s) for s in sources)}; "
        f"sequence length {data.get('seq_len')}",
        f"- steps: {steps}"
        + (f", {tokens:,} tokens" if tokens else "")
        + f" (micro batch {batch} per rank)",
        f"- optimizer: lr {optim.get('lr')}, warmup {optim.get('warmup_steps')} steps, "
        f"weight decay {optim.get('weight_decay')}",
        f"- objective: `{train.get('objective')}`; masking schedule "
        f"{diffusion.get('schedule')}, weighting {diffusion.get('weighting')}, "
        f"block curriculum {diffusion.get('block_curriculum') or 'none'}; distillation "
        f"weight {run.get('distill', {}).get('weight')}",
        f"- precision: {run.get('precision', {}).get('dtype')}; DeepSpeed ZeRO stage "
        f"{run.get('deepspeed', {}).get('stage')}",
    ]
    if run_info.get("wandb_url"):
        lines.append(f"- W&B run: {run_info['wandb_url']}")
    return lines


def _number(value, spec: str) -> str:
    """``value`` formatted, or ``n/a`` where the report has none (e.g. a retained ratio of
    a backbone that scored zero)."""
    return "n/a" if value is None else format(value, spec)


def _results(report: dict | None, run_info: dict) -> list[str]:
    if not report:
        return ["Not evaluated in this run (`python -m twotower_train mode=eval ...` scores it)."]
    lines = [
        f"Retained performance of the backbone (two-tower / AR, ratio of averages): "
        f"**{_number(report.get('retained'), '.3f')}** at "
        f"{_number(report.get('tokens_per_forward'), '.2f')} "
        f"tokens per denoiser forward (threshold {report.get('threshold')}, order "
        f"{report.get('order')})"
        + (
            " (95% interval {:.3f}-{:.3f})".format(*report["retained_interval"])
            if report.get("retained_interval")
            else ""
        )
        + (
            f"; {report['speedup_vs_ar']:.2f}x the AR tokens/s at batch 1"
            if report.get("speedup_vs_ar")
            else ""
        )
        + ".",
        "",
        "| task | metric | backbone (AR) | two-tower | retained |",
        "|---|---|---:|---:|---:|",
    ]
    footnote = False
    for task in report.get("tasks", []):
        retained = task.get("retained")
        mark = ""
        if task.get("in_retained") is False:
            mark, footnote = " *", True
        two = f"{task['twotower']:.3f}" + interval_text(task.get("twotower_interval"))
        lines.append(
            f"| {task['name']}{mark} | {task['metric']} | {task['backbone']:.3f} | "
            f"{two} | {retained:.3f} |"
            if retained is not None
            else f"| {task['name']}{mark} | {task['metric']} | {task['backbone']} | "
            f"{task['twotower']} | -- |"
        )
    if footnote:
        lines += [
            "",
            "\\* not in the summary ratio (perplexity: lower is better, retained = backbone / "
            "two-tower; ar_agreement: reported beside it).",
        ]
    n = {t.get("n") for t in report.get("tasks", []) if t.get("n")}
    if n:
        lines += [
            "",
            f"Examples per task: {', '.join(str(x) for x in sorted(n))}; brackets: binomial 95% "
            "(Wilson) intervals.",
        ]
    plot = run_info.get("plot")
    if plot:
        lines += ["", f"![retained vs tokens per forward]({Path(plot).name})"]
    return lines
