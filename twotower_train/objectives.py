"""Training objectives as thin modules around a model: forward(batch) -> metrics.

The engine wraps one of these, so DeepSpeed sees a module whose forward returns
the loss; the model code itself knows nothing about objectives. Scoring and exporting
what was trained is the run's business (``run/evaluate.py``), not the objective's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from twotower_train.config import DiffusionConfig, DistillConfig
from twotower_train.diffusion import (
    after_eos_targets,
    ce_weights,
    diffusion_ce,
    distillation_kl,
    expand_blocks,
    kd_weights,
    kl_per_row,
    loss_token_count,
    mask_prob,
    mask_tokens,
    sample_t,
    shift_teacher_logits,
)
from twotower_train.model.head import (
    Rows,
    add_sums,
    chunk_rows,
    chunked_sums,
    decoder_hidden,
    head_vocab,
)
from twotower_train.model.head import lm_logits as hf_lm_logits
from twotower_train.model.masks import block_document_ids

# How a loss gets its logits: "rows" runs the LM head on the scored rows only, a chunk at a
# time (never a [B, L, V] tensor); "full" on every position (the plain reference).
LM_HEAD_MODES = ("rows", "full")


def _check_lm_head(mode: str) -> str:
    if mode not in LM_HEAD_MODES:
        raise ValueError(f"lm_head must be one of {LM_HEAD_MODES}, got {mode!r}")
    return mode


class CausalLMObjective(nn.Module):
    """Next-token cross-entropy, for pretraining or fine-tuning an AR backbone."""

    def __init__(self, model: nn.Module, *, lm_head: str = "rows", chunk: int = 0):
        super().__init__()
        self.model = model
        self.lm_head = _check_lm_head(lm_head)
        self.chunk = chunk  # rows per LM-head chunk (0 = a 256 MiB fp32 chunk)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """input_ids [B, L] -> {"loss": mean next-token CE over positions with loss}."""
        ids = batch["input_ids"]
        has_target = batch["loss_mask"][:, 1:]
        if self.lm_head == "full":
            logits = self.model(input_ids=ids).logits  # [B, L, V]
            targets = ids[:, 1:].masked_fill(~has_target, -100)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten())
            return {"loss": loss}
        hidden = decoder_hidden(self.model, ids, None)[:, :-1]  # position p predicts p + 1
        flat = has_target.flatten().nonzero()[:, 0]
        rows = Rows(hidden.flatten(0, 1)[flat], lambda h: hf_lm_logits(self.model, h))
        targets = ids[:, 1:].flatten()[flat]

        def ce_sum(start: int, stop: int, target: torch.Tensor) -> tuple[torch.Tensor]:
            logits = rows.logits(slice(start, stop))
            return (F.cross_entropy(logits, target, reduction="sum"),)

        chunk = chunk_rows(head_vocab(self.model), self.chunk)
        (total,) = chunked_sums(ce_sum, len(rows), chunk, targets)
        return {"loss": total / max(len(rows), 1)}


def _token_mean(values: list[torch.Tensor], counts: list[torch.Tensor]) -> torch.Tensor:
    """One pass's loss as it is; several passes' per-token means merged by their counts."""
    if len(values) == 1:
        return values[0]
    total = sum(counts)
    return sum(v * n for v, n in zip(values, counts)) / total.clamp(min=1)


class TwoTowerObjective(nn.Module):
    """Block-diffusion CE on masked positions + KL distillation from the context tower.

    One forward: sample t per block, corrupt the clean sequence (absorbing [MASK],
    prompts never masked), run both towers once, and compare the denoiser at masked
    positions with the targets (CE) and with the AR teacher's shifted next-token
    distribution (KD). Noise comes from torch's global RNG, which checkpoints restore.
    """

    def __init__(
        self,
        model: nn.Module,
        diffusion: DiffusionConfig,
        distill: DistillConfig,
        *,
        doc_mask: bool = True,
        eos_id: int | None = None,
        lm_head: str = "rows",
        chunk: int = 0,
    ):
        super().__init__()
        self.lm_head = _check_lm_head(lm_head)
        self.chunk = chunk  # rows per LM-head chunk (0 = a 256 MiB fp32 chunk)
        self.model = model
        self.mask_id = model.config.mask_token_id
        self.time_conditioning = model.config.time_conditioning
        self.diffusion = diffusion
        self.distill = distill
        self.doc_mask = doc_mask  # use the batch's doc_ids (data.doc_mask)
        self.eos_id = eos_id
        # Share of training done, in [0, 1]: the loop sets it before each step (it picks the
        # block size of ``diffusion.block_curriculum``); 1.0 = the model's own block size.
        self.progress = 1.0

    def training_block_size(self) -> int:
        """The block size of this step: stage ``floor(progress * k)`` of the ``k`` stages
        ``[*diffusion.block_curriculum, block_size]`` (each capped at the block size)."""
        full = self.model.config.block_size
        stages = [min(b, full) for b in self.diffusion.block_curriculum] + [full]
        return stages[min(int(self.progress * len(stages)), len(stages) - 1)]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """input_ids, loss_mask [B, L] (doc_ids [B, L]) -> {"loss", "ce", ("kd"),
        "masked_acc", "masked_ce"}, at this step's block size (passed to the model, whose
        own ``block_size`` is what decoding uses)."""
        bs = self.training_block_size()
        clean, loss_mask = batch["input_ids"], batch["loss_mask"]
        b, length = clean.shape
        d = self.diffusion
        doc_ids = batch.get("doc_ids") if self.doc_mask else None
        # ``ids``: what the noisy blocks are made from and scored against; ``scored``: where
        # a masked position enters the loss. Without documents, both are the plain row.
        ids, maskable, scored = clean, loss_mask, loss_mask
        in_block_doc = torch.ones_like(loss_mask)
        if doc_ids is not None:
            in_block_doc = doc_ids == block_document_ids(doc_ids, bs)
            ids, maskable, scored = after_eos_targets(
                clean, in_block_doc, loss_mask, mode=d.after_eos.value, eos_id=self.eos_id
            )
        t = sample_t(
            b,
            length // bs,
            per=d.t_per.value,
            eps=d.eps,
            antithetic=d.antithetic,
            device=ids.device,
        )
        noisy, masked, _ = mask_tokens(
            ids,
            t,
            block_size=bs,
            mask_id=self.mask_id,
            schedule=d.schedule.value,
            mask_range=tuple(d.mask_range),
            loss_mask=maskable,
            suffix_prob=d.suffix_prob,
        )
        # A time-conditioned denoiser reads each block's mask rate m(t), not t: decoding
        # knows the masked fraction of a block, whatever schedule trained the model.
        rate = None
        if self.time_conditioning:
            rate = mask_prob(t, d.schedule.value).clamp(*d.mask_range)
        passes = [(noisy, masked & scored, rate)]
        if d.complementary:  # the other half of every block, same context pass
            comp = maskable & ~masked
            noisy_c = torch.where(comp, torch.full_like(ids, self.mask_id), ids)
            passes.append((noisy_c, comp & scored, None if rate is None else 1.0 - rate))
        kd_valid = None
        if self.distill.weight > 0:  # no teacher at p = 0; it reads the real next document
            kd_valid = in_block_doc.clone()
            kd_valid[:, 0] = False
        step = _Step(clean, ids, doc_ids, bs, expand_blocks(t, bs), scored.sum(), kd_valid)
        if self.lm_head == "full":
            sums = self._full_logits(step, passes)
        else:
            sums = self._scored_rows(step, passes)
        ces = [s.ce for s in sums]
        n_ce = [s.n_ce for s in sums]
        ce = _token_mean(ces, n_ce)
        out = {"ce": ce.detach()}
        loss = ce
        if kd_valid is not None:
            kd = _token_mean([s.kd for s in sums], [s.n_kd for s in sums])
            loss = ce + self.distill.weight * kd
            out["kd"] = kd.detach()
        n_masked = sum(n_ce).clamp(min=1)
        out["masked_acc"] = sum(s.correct for s in sums).float() / n_masked
        out["masked_ce"] = sum(s.plain_ce_sum for s in sums) / n_masked
        out["loss"] = loss
        return out

    def _scored_rows(self, step: _Step, passes) -> list[_PassSums]:
        """Each pass's losses with the LM heads run on the scored rows only, in chunks."""
        d, kd_on = self.diffusion, step.kd_valid is not None
        ctx_out = self.model.context_forward(
            step.clean,
            doc_ids=step.doc_ids,
            block_size=step.bs,
            logits=False,
        )
        out = []
        for noisy_p, masked_p, rate_p in passes:
            hidden = self.model.denoise(
                noisy_p, ctx_out, t=rate_p, doc_ids=step.doc_ids, block_size=step.bs, logits=False
            )
            flat = masked_p.flatten().nonzero()[:, 0]  # [N] scored positions
            targets = step.ids.flatten()[flat]
            t_rows = step.t_tok.flatten()[flat]
            ce_w = ce_weights(t_rows, d.weighting.value, d.schedule.value)
            kd_w = torch.zeros_like(ce_w)
            teacher = None
            if kd_on:
                teacher = self.model.teacher_rows(ctx_out, flat)
                kd_w = kd_weights(t_rows, self.distill.t_weighting.value, len(flat), flat.device)
                kd_w = kd_w * step.kd_valid.flatten()[flat]
            total = None
            for which, rows in self.model.loss_rows(hidden, ctx_out, flat, step.bs):
                total = add_sums(total, self._row_sums(rows, teacher, which, targets, ce_w, kd_w))
            ce_sum, kd_sum, correct, plain = total
            n_ce = masked_p.sum()
            denom = n_ce.clamp(min=1).float()
            if d.weighting.value == "elbo":
                denom = loss_token_count(step.num_loss_tokens, ce_sum.device)
            n_kd = (masked_p & step.kd_valid).sum() if kd_on else n_ce
            kd = kd_sum / n_kd.clamp(min=1) * self.distill.temperature**2
            out.append(_PassSums(ce_sum / denom, n_ce, kd, n_kd, correct, plain))
        return out

    def _row_sums(self, rows: Rows, teacher: Rows | None, which, targets, ce_w, kd_w):
        """(weighted CE, weighted KL, correct, plain CE) summed over ``rows``, a chunk of
        rows at a time; ``which [n]`` places them among the pass's scored rows."""
        temperature, direction = self.distill.temperature, self.distill.direction.value

        def sums(start: int, stop: int, idx: torch.Tensor):
            logits = rows.logits(slice(start, stop))
            target = targets[idx]
            ce = F.cross_entropy(logits, target, reduction="none")
            kd = ce.new_zeros(())
            if teacher is not None:
                kl = kl_per_row(
                    logits, teacher.logits(idx), temperature=temperature, direction=direction
                )
                kd = (kl * kd_w[idx]).sum()
            with torch.no_grad():
                correct = (logits.argmax(-1) == target).sum()
                plain = ce.detach().sum()
            return (ce * ce_w[idx]).sum(), kd, correct, plain

        chunk = chunk_rows(head_vocab(self.model.backbone), self.chunk)
        return chunked_sums(sums, len(rows), chunk, which)

    def _full_logits(self, step: _Step, passes) -> list[_PassSums]:
        """Each pass's losses from full ``[B, L, V]`` logits of both towers (the reference
        the scored-rows path is tested against)."""
        d, kd_on = self.diffusion, step.kd_valid is not None
        ctx_out = self.model.context_forward(
            step.clean,
            doc_ids=step.doc_ids,
            block_size=step.bs,
        )
        teacher = shift_teacher_logits(ctx_out.logits)[0] if kd_on else None
        out = []
        for noisy_p, masked_p, rate_p in passes:
            logits = self.model.denoise(
                noisy_p, ctx_out, t=rate_p, doc_ids=step.doc_ids, block_size=step.bs
            )
            ce = diffusion_ce(
                logits,
                step.ids,
                masked_p,
                t_tok=step.t_tok,
                weighting=d.weighting.value,
                schedule=d.schedule.value,
                num_loss_tokens=step.num_loss_tokens,
            )
            n_ce = masked_p.sum()
            kd, n_kd = ce.new_zeros(()), n_ce
            if kd_on:
                kd_mask = masked_p & step.kd_valid
                kd = distillation_kl(
                    logits,
                    teacher,
                    kd_mask,
                    temperature=self.distill.temperature,
                    direction=self.distill.direction.value,
                    t_tok=step.t_tok,
                    t_weighting=self.distill.t_weighting.value,
                )
                n_kd = kd_mask.sum()
            with torch.no_grad():
                correct = ((logits.argmax(-1) == step.ids) & masked_p).sum()
                plain = diffusion_ce(logits, step.ids, masked_p).detach() * n_ce
            out.append(_PassSums(ce, n_ce, kd, n_kd, correct, plain))
        return out


@dataclass
class _Step:
    """What every pass of one step shares."""

    clean: torch.Tensor  # [B, L] the clean row (what the context tower reads)
    ids: torch.Tensor  # [B, L] targets (= the clean row, or its after-EOS variant)
    doc_ids: torch.Tensor | None
    bs: int
    t_tok: torch.Tensor  # [B, L] per-token diffusion time
    num_loss_tokens: torch.Tensor  # positions that could be masked (the ELBO denominator)
    kd_valid: torch.Tensor | None  # [B, L] where the AR teacher is read (None: KD off)


@dataclass
class _PassSums:
    ce: torch.Tensor  # this pass's CE (its mean, or its ELBO estimate)
    n_ce: torch.Tensor
    kd: torch.Tensor  # this pass's mean KL (times T^2)
    n_kd: torch.Tensor
    correct: torch.Tensor
    plain_ce_sum: torch.Tensor
