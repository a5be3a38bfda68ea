"""End-to-end distillation: train the thin q/k so the whole model predicts what the original predicts.

Loss per token (``kind``):

* ``kl``: ``KL(p_teacher || p_student)`` over the vocabulary, the teacher being the unmodified
  source model. It pulls the thin model back toward the original distribution and nothing else,
  so what it measures is *recovery*. (Plain next-token cross-entropy on Wikipedia would also
  adapt the chat model to Wikipedia, and could "beat" the original on Wikipedia perplexity for
  reasons that have nothing to do with thin keys.)
* ``ce``: next-token cross-entropy on the text (no teacher forward: cheaper per step).
* ``kl+ce``: their sum.

Every step also reports, on the batch it is about to train on (text it has not been trained on:
training makes a single pass over fresh windows), the student's and the teacher's
cross-entropy. Their difference is an honest running estimate of the perplexity gap,
``ppl_student / ppl_teacher = exp(ce_student - ce_teacher)``, logged at no extra cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LOSS_KINDS = ("kl", "ce", "kl+ce")


@dataclass
class StepStats:
    loss: float
    kl: float | None
    ce_student: float
    ce_teacher: float | None
    tokens: int


def distill_step(
    student: nn.Module,
    teacher: nn.Module | None,
    batch: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    *,
    kind: str = "kl",
    clip: float = 1.0,
) -> StepStats:
    """One optimizer step on ``batch`` ``[B, T]`` token ids (see the module docstring for ``kind``)."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"loss {kind!r} is not one of {LOSS_KINDS}")
    labels = batch[:, 1:]  # position t predicts token t + 1
    teacher_logp = ce_teacher = None
    if teacher is not None:
        with torch.no_grad():
            t_logits = teacher(input_ids=batch, use_cache=False).logits[:, :-1].float()  # [B, T-1, V]
            teacher_logp = F.log_softmax(t_logits, dim=-1)
            del t_logits
            ce_teacher = float(-teacher_logp.gather(-1, labels[..., None]).mean())
    s_logits = student(input_ids=batch, use_cache=False).logits[:, :-1].float()  # [B, T-1, V]
    student_logp = F.log_softmax(s_logits, dim=-1)
    del s_logits
    ce = -student_logp.gather(-1, labels[..., None]).mean()
    kl = None
    if teacher_logp is not None:
        # sum_v p_t (log p_t - log p_s), averaged over tokens
        kl = F.kl_div(student_logp.flatten(0, 1), teacher_logp.flatten(0, 1), log_target=True, reduction="batchmean")
    loss = {"kl": kl, "ce": ce, "kl+ce": None if kl is None else kl + ce}[kind]
    if loss is None:
        raise ValueError(f"loss {kind!r} needs a teacher")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    return StepStats(
        loss=float(loss.detach()),
        kl=None if kl is None else float(kl.detach()),
        ce_student=float(ce.detach()),
        ce_teacher=ce_teacher,
        tokens=int(labels.numel()),
    )
