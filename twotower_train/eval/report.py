"""The retained-performance report: ``report.json``, ``report.md``, a PNG, and W&B.

``report.json`` (the contract in DESIGN.md, plus details)::

    retained                  mean(two-tower) / mean(backbone) over the ratio tasks
    retained_mean_of_ratios   mean over the ratio tasks of two-tower / backbone
    tokens_per_forward        new tokens per denoiser forward at the main threshold
    speedup_vs_ar             two-tower tokens/s / AR tokens/s, batch 1, same prompts
    tasks                     [{name, metric, backbone, twotower, retained, higher_is_better,
                                in_retained, n, backbone_interval, twotower_interval}]
    retained_interval         95% interval of ``retained`` (below)
    retained_tasks, threshold, block_size, steps_per_block, sweep, speed, config

Intervals, so that a reader can tell a gain from noise: each accuracy (a share of ``n``
examples) gets its binomial 95% Wilson interval; ``retained`` gets a normal-approximation
interval by the delta method, ``R = T / B`` with ``T`` and ``B`` the two models' mean
accuracies and ``Var R ~ R^2 (Var T / T^2 + Var B / B^2)``, ``Var T = sum_t p_t (1 - p_t) /
n_t / K^2``. It treats the two models' samples as independent; they share their examples,
which correlates them positively, so the interval is conservative (wider than a paired one).

Ratio tasks are the higher-is-better ones (generation exact match, multiple-choice
accuracy). Perplexity-like rows (lower is better) get ``retained = backbone / twotower``
but stay out of the two summary ratios: an ELBO bound against an exact NLL is not the same
kind of number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from twotower_train.files import atomic_write_json, atomic_write_text

PLOT_NAME = "retained_vs_tokens_per_forward.png"
# The keys outside checks rely on (DESIGN.md, "Contracts").
REPORT_KEYS = (
    "retained",
    "retained_mean_of_ratios",
    "tokens_per_forward",
    "speedup_vs_ar",
    "tasks",
)


@dataclass
class TaskScore:
    name: str
    metric: str
    backbone: float
    twotower: float
    higher_is_better: bool = True
    n: int = 0
    # counted in the summary ratios (ar_agreement is reported beside them, not in them)
    in_summary: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def retained(self) -> float | None:
        num, den = (
            (self.twotower, self.backbone)
            if self.higher_is_better
            else (self.backbone, self.twotower)
        )
        return num / den if den > 0 else None


def _means(counted: list[TaskScore]) -> tuple[float, float]:
    """(two-tower, backbone) mean score over ``counted``."""
    k = len(counted)
    return sum(s.twotower for s in counted) / k, sum(s.backbone for s in counted) / k


def retained_ratios(scores: list[TaskScore]) -> tuple[float | None, float | None]:
    """(ratio of averages, mean of ratios) over the higher-is-better tasks; a task whose
    backbone scores 0 has no ratio and is left out of the mean of ratios."""
    counted = [s for s in scores if s.higher_is_better and s.in_summary]
    if not counted:
        return None, None
    two, back = _means(counted)
    ratios = [s.retained for s in counted if s.retained is not None]
    return (two / back if back > 0 else None), (sum(ratios) / len(ratios) if ratios else None)


Z95 = 1.959964  # the standard normal's 97.5% quantile


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Binomial 95% Wilson score interval of a share ``p`` of ``n`` trials (None if n = 0).
    Unlike the normal one it stays inside [0, 1] and is not empty at p = 0 or 1."""
    if n <= 0:
        return None
    z2n = z * z / n
    centre = (p + z2n / 2) / (1 + z2n)
    half = z * math.sqrt(p * (1 - p) / n + z2n / (4 * n)) / (1 + z2n)
    return max(0.0, centre - half), min(1.0, centre + half)


def retained_interval(scores: list[TaskScore], z: float = Z95) -> tuple[float, float] | None:
    """Delta-method 95% interval of the ratio of averages (module docstring); None when a
    counted task has no sample size or the backbone's mean is 0."""
    counted = [s for s in scores if s.higher_is_better and s.in_summary]
    if not counted or any(s.n <= 0 for s in counted):
        return None
    k = len(counted)
    two, back = _means(counted)
    if back <= 0:
        return None
    var_two = sum(s.twotower * (1 - s.twotower) / s.n for s in counted) / k**2
    var_back = sum(s.backbone * (1 - s.backbone) / s.n for s in counted) / k**2
    ratio = two / back
    rel = var_back / back**2 + (var_two / two**2 if two > 0 else 0.0)
    half = z * ratio * math.sqrt(rel)
    return max(0.0, ratio - half), ratio + half


def _intervals(s: TaskScore) -> dict:
    if not s.higher_is_better or s.n <= 0:
        return {}
    return {
        "backbone_interval": wilson_interval(s.backbone, s.n),
        "twotower_interval": wilson_interval(s.twotower, s.n),
    }


def build_report(
    scores: list[TaskScore],
    *,
    tokens_per_forward: float | None,
    speed: dict | None,
    sweep: list[dict],
    decode: dict,
    config: dict,
    wall_s: float,
    verified: dict | None = None,
) -> dict:
    retained, mean_of_ratios = retained_ratios(scores)
    speedup = None
    if speed and speed["ar"]["tokens_per_s"] > 0:
        speedup = speed["diffusion"]["tokens_per_s"] / speed["ar"]["tokens_per_s"]
    return {
        "retained": retained,
        "retained_interval": retained_interval(scores),
        "retained_mean_of_ratios": mean_of_ratios,
        "tokens_per_forward": tokens_per_forward,
        "speedup_vs_ar": speedup,
        "tasks": [
            {
                "name": s.name,
                "metric": s.metric,
                "backbone": s.backbone,
                "twotower": s.twotower,
                "retained": s.retained,
                "higher_is_better": s.higher_is_better,
                "in_retained": s.higher_is_better and s.in_summary,
                "n": s.n,
                **_intervals(s),
                **s.extra,
            }
            for s in scores
        ],
        "retained_tasks": [s.name for s in scores if s.higher_is_better and s.in_summary],
        **decode,
        "sweep": sweep,
        "speed": speed,
        "verified": verified,
        "eval_wall_s": wall_s,
        "config": config,
    }


def _fmt(x, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.4g}"


def interval_text(interval) -> str:
    """`` [lo, hi]`` to three decimals, or nothing without an interval."""
    return f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""


def _with_interval(x, interval) -> str:
    return _fmt(x) + interval_text(interval)


def _retained_interval_text(interval) -> str:
    if not interval:
        return ""
    return (
        f" (95% interval {100 * interval[0]:.1f}-{100 * interval[1]:.1f}%: delta method, "
        "the two models' samples taken as independent, so conservative)"
    )


def _lm_eval_note(rows: list[dict]) -> list[str]:
    """A line naming the lm-eval tasks, their source and split (none without them)."""
    lm = [t for t in rows if str(t.get("source", "")).startswith("lm-eval")]
    if not lm:
        return []
    names = ", ".join(f"{t['name']} ({t.get('split')})" for t in lm)
    return [f"{lm[0]['source']} task definitions, zero-shot, on local data: {names}."]


def report_markdown(report: dict) -> str:
    lines = [
        "# Retained performance: two-tower (diffusion) vs backbone (AR)",
        "",
        "| task | metric | n | backbone (AR) | two-tower (diffusion) | retained |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for t in report["tasks"]:
        mark = "" if t["in_retained"] else " *"
        lines.append(
            f"| {t['name']}{mark} | {t['metric']} | {t.get('n', '')} | "
            f"{_with_interval(t['backbone'], t.get('backbone_interval'))} | "
            f"{_with_interval(t['twotower'], t.get('twotower_interval'))} | "
            f"{_fmt(t['retained'], pct=True)} |"
        )
    names = ", ".join(report["retained_tasks"]) or "none"
    steps = report.get("steps_per_block")
    lines += [
        "",
        "\\* not in the summary ratios (perplexity: lower is better, retained = backbone / "
        "two-tower; ar_agreement: reported beside them).",
        "Brackets: binomial 95% (Wilson) intervals.",
        *_lm_eval_note(report["tasks"]),
        "",
        f"- **retained** (ratio of averages over {names}): {_fmt(report['retained'], True)}"
        + _retained_interval_text(report.get("retained_interval")),
        f"- **retained, mean of ratios**: {_fmt(report['retained_mean_of_ratios'], True)}",
        f"- **tokens per denoiser forward** (threshold {report.get('threshold')}, order "
        f"{report.get('order', 'any')}, block {report.get('block_size')}, at most {steps} "
        "steps per block): "
        f"{_fmt(report['tokens_per_forward'])}",
    ]
    speed = report.get("speed")
    if speed:
        lines.append(
            f"- **speed vs AR** (batch 1, {speed['examples']} prompts, wall clock on "
            f"{speed['device']}): {_fmt(report['speedup_vs_ar'])}x "
            f"(diffusion {speed['diffusion']['tokens_per_s']:.1f} tokens/s, "
            f"AR {speed['ar']['tokens_per_s']:.1f} tokens/s)"
        )
    verified = report.get("verified")
    if verified:
        lines += [
            "",
            "## Verified decoding (lossless: the backbone checks every drafted block)",
            "",
            f"- **retained**: {_fmt(verified['retained'], True)} "
            f"(exact-match tasks: {', '.join(verified['tasks'])})",
            f"- **tokens per step** (drafts at threshold {verified.get('threshold')}; a step = "
            f"the denoiser forwards drafting a block + one context forward verifying it): "
            f"{_fmt(verified['tokens_per_step'])}; mean "
            f"accepted drafted tokens per step: {_fmt(verified['mean_accepted'])}",
            f"- **speed vs AR** (batch 1, same prompts): {_fmt(verified['speedup_vs_ar'])}x",
        ]
    agreement = report.get("ar_agreement")
    if agreement:
        lines += [
            "",
            "## AR agreement (held-out text; share of the backbone's first 64 greedy tokens "
            "reproduced at the same position)",
            "",
            "| decoding | threshold | agreement | tokens / forward | positions |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for mode in ("diffusion", "verified"):
            row = agreement.get(mode)
            if row:
                lines.append(
                    f"| {mode} | {row['threshold']} | {_fmt(row['agreement'])} | "
                    f"{_fmt(row['tokens_per_forward'])} | {row['positions']} |"
                )
    if report["sweep"]:
        lines += [
            "",
            "## Threshold sweep",
            "",
            "| threshold | tokens / forward | retained |",
            "| ---: | ---: | ---: |",
        ]
        for row in report["sweep"]:
            lines.append(
                f"| {row['threshold']} | {_fmt(row['tokens_per_forward'])} | "
                f"{_fmt(row['retained'], True)} |"
            )
        lines += ["", f"![retained vs tokens per forward]({PLOT_NAME})"]
    lines.append("")
    return "\n".join(lines)


def plot_sweep(report: dict, path: Path) -> None:
    """Retained % against tokens per denoiser forward, one point per threshold; the AR
    backbone is the reference point (1 token per forward, 100%)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=100)
    pts = [r for r in report["sweep"] if r["retained"] is not None]
    xs = [r["tokens_per_forward"] for r in pts]
    ys = [100 * r["retained"] for r in pts]
    ax.plot(xs, ys, "o-", label="two-tower (diffusion)")
    for r, x, y in zip(pts, xs, ys):
        ax.annotate(f"{r['threshold']:g}", (x, y), textcoords="offset points", xytext=(4, 4))
    ax.plot([1.0], [100.0], "s", color="gray", label="backbone (AR)")
    ax.set_xlabel("tokens per denoiser forward")
    ax.set_ylabel("retained %")
    ax.set_title("Retained performance vs decoding parallelism")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(report: dict, out_dir: Path) -> dict[str, Path]:
    """``report.json``, ``report.md`` and the plot into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "report.json",
        "md": out_dir / "report.md",
        "plot": out_dir / PLOT_NAME,
    }
    atomic_write_json(paths["json"], report)
    atomic_write_text(paths["md"], report_markdown(report))
    plot_sweep(report, paths["plot"])
    return paths


def summary_metrics(report: dict) -> dict[str, float]:
    """Flat numbers for ``metrics.jsonl`` / W&B: ``eval/*`` summaries (printed on the console
    line) and ``eval_task/<task>/<tower>`` per task."""
    out: dict[str, float] = {}
    for key in ("retained", "retained_mean_of_ratios", "tokens_per_forward", "speedup_vs_ar"):
        if report[key] is not None:
            out[f"eval/{key}"] = float(report[key])
    for key, value in (report.get("verified") or {}).items():
        if isinstance(value, float | int):
            out[f"eval/verified_{key}"] = float(value)
    for t in report["tasks"]:
        for col in ("backbone", "twotower", "retained"):
            if t[col] is not None:
                out[f"eval_task/{t['name']}/{col}"] = float(t[col])
    return out


def log_report(report: dict, paths: dict[str, Path], logger, step: int | None) -> None:
    """The summary numbers through ``logger.log(step, ...)``; with a W&B run on the logger
    (``logger.wandb``), also the side-by-side table, the plot and the run summary."""
    if logger is None:
        return
    metrics = summary_metrics(report)
    logger.log(step if step is not None else 0, metrics)
    run = getattr(logger, "wandb", None)
    if run is None:
        return
    import wandb

    columns = ["task", "metric", "backbone", "twotower", "retained"]
    table = wandb.Table(
        columns=columns,
        data=[[t[c if c != "task" else "name"] for c in columns] for t in report["tasks"]],
    )
    payload = {"eval/table": table, "eval/plot": wandb.Image(str(paths["plot"]))}
    if step is not None:
        run.log(payload, step=step)
    else:
        run.log(payload)
    for key, value in metrics.items():
        if key.startswith("eval/"):
            run.summary[key] = value
