"""Noise schedules and time sampling for absorbing-state (MDLM-style) masked diffusion.

Time t lives in [eps, 1]. A schedule maps t to the probability m(t) that a token is in
the absorbing [MASK] state; the continuous-time ELBO weights the cross-entropy of a
masked token by w(t) = m'(t) / m(t).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Schedule = Literal["linear", "cosine"]
TimePer = Literal["example", "block"]


def mask_prob(t: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Probability m(t) that a token is masked at time t; any shape, fp32 out.

    linear: m(t) = t.  cosine: m(t) = 1 - cos(pi/2 t), written as 2 sin^2(pi t / 4)
    so it keeps full precision for small t.
    """
    t = t.float()
    if schedule == "linear":
        return t
    if schedule == "cosine":
        return 2.0 * torch.sin(0.25 * math.pi * t) ** 2
    raise ValueError(f"unknown schedule {schedule!r}; expected 'linear' or 'cosine'")


def elbo_weight(t: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """ELBO weight w(t) = m'(t) / m(t); any shape, fp32 out. Diverges as t -> 0 (keep t >= eps).

    linear: 1 / t.  cosine: (pi/2) sin(pi t/2) / (1 - cos(pi t/2)), which simplifies to
    (pi/2) / tan(pi t / 4) (the form used here: no cancellation near t = 0).
    """
    t = t.float()
    if schedule == "linear":
        return 1.0 / t
    if schedule == "cosine":
        return 0.5 * math.pi / torch.tan(0.25 * math.pi * t)
    raise ValueError(f"unknown schedule {schedule!r}; expected 'linear' or 'cosine'")


def sample_t(
    batch_size: int,
    num_blocks: int,
    *,
    per: TimePer = "example",
    eps: float = 1e-3,
    antithetic: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Diffusion times t [B, num_blocks] in [eps, 1], fp32.

    per="example": one draw per sequence, repeated over its blocks (n = B draws).
    per="block": one independent draw per block (n = B * num_blocks draws).
    antithetic: stratified draws as in MDLM, u_i = (i + U_i) / n with U_i ~ U[0, 1), one
    draw per stratum [i/n, (i+1)/n), then shuffled with `generator` so a stratum is not
    tied to a batch row or block position. Each draw is still marginally uniform.
    All draws are mapped to t = eps + (1 - eps) u.

    Random numbers are made on the generator's device (CPU when there is none) and then
    moved to `device`, so a seed gives the same t on CPU and CUDA.
    """
    if per not in ("example", "block"):
        raise ValueError(f"unknown per={per!r}; expected 'example' or 'block'")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    n = batch_size if per == "example" else batch_size * num_blocks
    u = torch.rand(n, generator=generator, device=gen_device)
    if antithetic:
        strata = torch.arange(n, device=gen_device, dtype=u.dtype)
        u = (strata + u) / n
        u = u[torch.randperm(n, generator=generator, device=gen_device)]
    t = eps + (1.0 - eps) * u
    if per == "example":
        t = t[:, None].expand(batch_size, num_blocks).contiguous()
    else:
        t = t.view(batch_size, num_blocks)
    return t.to(device if device is not None else gen_device)
