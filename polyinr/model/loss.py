"""Hinge losses of the projected GAN, as pure functions of the heads' logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def d_hinge(real_logits: Sequence[torch.Tensor], fake_logits: Sequence[torch.Tensor]):
    """D loss: sum over heads of mean(relu(1 - real)) + mean(relu(1 + fake)), in float32."""
    real = sum(F.relu(1 - r.float()).mean() for r in real_logits)
    fake = sum(F.relu(1 + f.float()).mean() for f in fake_logits)
    return real + fake


def g_hinge(fake_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """G loss: sum over heads of mean(-fake), in float32."""
    return sum(-f.float().mean() for f in fake_logits)
