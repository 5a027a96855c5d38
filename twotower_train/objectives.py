"""Training objectives as thin modules around a model: forward(batch) -> metrics.

The engine wraps one of these, so DeepSpeed sees a module whose forward returns
the loss; the model code itself knows nothing about objectives. Scoring and exporting
what was trained is the run's business (``run/evaluate.py``), not the objective's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from twotower_train.config import DiffusionConfig, DistillConfig
from twotower_train.diffusion import (
    after_eos_targets,
    diffusion_ce,
    distillation_kl,
    expand_blocks,
    mask_prob,
    mask_tokens,
    sample_t,
    shift_teacher_logits,
)
from twotower_train.model.masks import block_document_ids


class CausalLMObjective(nn.Module):
    """Next-token cross-entropy, for pretraining or fine-tuning an AR backbone."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """input_ids [B, L] -> {"loss": mean next-token CE over positions with loss}."""
        ids = batch["input_ids"]
        logits = self.model(input_ids=ids).logits  # [B, L, V]
        targets = ids[:, 1:].masked_fill(~batch["loss_mask"][:, 1:], -100)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten())
        return {"loss": loss}


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
    ):
        super().__init__()
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
        ctx_out = self.model.context_forward(clean, doc_ids=doc_ids, block_size=bs)
        t_tok = expand_blocks(t, bs)
        teacher = valid = None
        if self.distill.weight > 0:
            teacher, valid = shift_teacher_logits(ctx_out.logits)
            valid = valid & in_block_doc  # the teacher reads the real next document
        ces, kds, n_ce, n_kd = [], [], [], []
        correct = plain_sum = torch.zeros((), device=ids.device)
        for noisy_p, masked_p, rate_p in passes:
            logits = self.model.denoise(noisy_p, ctx_out, t=rate_p, doc_ids=doc_ids, block_size=bs)
            ces.append(
                diffusion_ce(
                    logits,
                    ids,
                    masked_p,
                    t_tok=t_tok,
                    weighting=d.weighting.value,
                    schedule=d.schedule.value,
                    num_loss_tokens=scored.sum(),
                )
            )
            n_ce.append(masked_p.sum())
            if teacher is not None:
                kd_mask = masked_p & valid
                kds.append(
                    distillation_kl(
                        logits,
                        teacher,
                        kd_mask,
                        temperature=self.distill.temperature,
                        direction=self.distill.direction.value,
                        t_tok=t_tok,
                        t_weighting=self.distill.t_weighting.value,
                    )
                )
                n_kd.append(kd_mask.sum())
            with torch.no_grad():
                correct = correct + ((logits.argmax(-1) == ids) & masked_p).sum()
                # plain mean CE over masked tokens, whatever the training weighting
                plain = (
                    ces[-1] if d.weighting.value == "none" else diffusion_ce(logits, ids, masked_p)
                )
                plain_sum = plain_sum + plain.detach() * n_ce[-1]
        ce = _token_mean(ces, n_ce)
        out = {"ce": ce.detach()}
        loss = ce
        if teacher is not None:
            kd = _token_mean(kds, n_kd)
            loss = ce + self.distill.weight * kd
            out["kd"] = kd.detach()
        n_masked = sum(n_ce).clamp(min=1)
        out["masked_acc"] = correct.float() / n_masked
        out["masked_ce"] = plain_sum / n_masked
        out["loss"] = loss
        return out
