"""Knowledge distillation of a quantized student from its float teacher (LLM-QAT, arXiv 2305.17888, 2.2).

Loss: the cross-entropy between the teacher's next-token distribution (soft labels) and the student's, at
every position of every generated sequence. It is reported as the KL divergence ``KL(teacher || student)``
(the cross-entropy minus the teacher's entropy: the same gradient), averaged over tokens (the paper's
``kl_div(..., reduction="batchmean")`` sums over a sequence instead: a constant factor AdamW does not see).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FptqError
from .config import QATConfig
from .student import trainable_parameters

log = logging.getLogger(__name__)

__all__ = ["kd_loss", "distill", "DistillResult", "cosine_lr"]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ``KL(softmax(teacher) || softmax(student))`` in nats, computed in float32."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(dim=-1).mean()


def cosine_lr(step: int, total: int) -> float:
    """Learning-rate factor of ``step`` (0-based) of ``total``: cosine from 1 down to 0, no warmup."""
    return 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


@dataclass
class DistillResult:
    steps: int
    tokens: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # KL per step, nats/token

    def to_dict(self) -> dict:
        n = max(1, len(self.losses) // 10)
        return {"steps": self.steps, "tokens": self.tokens, "seconds": self.seconds,
                "tokens_per_s": self.tokens / max(self.seconds, 1e-9),
                "kl_first": sum(self.losses[:n]) / n if self.losses else None,
                "kl_last": sum(self.losses[-n:]) / n if self.losses else None}


def _batches(num: int, batch_size: int, steps: int, seed: int):
    """Row indices of each step: seeded permutations of the data, one per epoch."""
    g = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(num, generator=g), 0
    for _ in range(steps):
        if pos + batch_size > num:
            perm, pos = torch.randperm(num, generator=g), 0
        yield perm[pos: pos + batch_size]
        pos += batch_size


def distill(student: nn.Module, teacher: nn.Module, data: torch.Tensor, qat: QATConfig,
            device: str | torch.device | None = None, progress: bool = True) -> DistillResult:
    """Train ``student`` (its :class:`~fptq.qat.student.QATLinear` latent weights, norms and, when learnable,
    static activation scales) to match ``teacher`` on ``data`` (``[N, L]`` token ids) with AdamW, cosine
    learning rate, gradient clipping (:class:`~fptq.qat.QATConfig`). Progress bar: KL, tokens/s, ETA."""
    if data.dim() != 2 or data.shape[0] < qat.batch_size:
        raise FptqError(f"distillation needs a [num_sequences, length] tensor of at least {qat.batch_size} "
                        f"sequences, got shape {tuple(data.shape)}")
    device = torch.device(device) if device is not None else next(student.parameters()).device
    torch.manual_seed(qat.seed)
    weights, scales = trainable_parameters(student)
    groups = [{"params": weights, "lr": qat.lr}]
    if scales:
        groups.append({"params": scales, "lr": qat.act_scale_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=qat.lr, weight_decay=qat.weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if qat.dtype == "bfloat16"
                else contextlib.nullcontext())
    params = weights + scales
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=qat.steps, desc="QAT distillation", unit="step")
    result = DistillResult(0, 0, 0.0)
    was_training = student.training
    student.train()
    t0 = time.perf_counter()
    ema = None
    try:
        for step, rows in enumerate(_batches(data.shape[0], qat.batch_size, qat.steps, qat.seed)):
            ids = data[rows].to(device)
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * cosine_lr(step, qat.steps)
            with torch.inference_mode(), autocast:
                t_logits = teacher(ids, use_cache=False).logits
            t_logits = t_logits.clone()  # usable by autograd
            with autocast:
                s_logits = student(ids, use_cache=False).logits
            loss = kd_loss(s_logits, t_logits)
            if not torch.isfinite(loss):
                raise FptqError(f"the distillation loss became {float(loss)} at step {step}; lower --qat-lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, qat.max_grad_norm)
            opt.step()
            del s_logits, t_logits
            kl = float(loss.detach())
            result.losses.append(kl)
            result.steps += 1
            result.tokens += ids.numel()
            ema = kl if ema is None else 0.9 * ema + 0.1 * kl
            elapsed = time.perf_counter() - t0
            if bar is not None:
                bar.set_postfix(kl=f"{ema:.4f}", tok_s=f"{result.tokens / elapsed:.0f}")
                bar.update(1)
            if step % 10 == 0 or step == qat.steps - 1:
                log.info("step %d/%d  KL %.4f (ema %.4f)  %.0f tok/s  ETA %.0f s", step + 1, qat.steps, kl, ema,
                         result.tokens / elapsed, elapsed / (step + 1) * (qat.steps - step - 1))
    finally:
        if bar is not None:
            bar.close()
        student.train(was_training)
        for p in student.parameters():
            p.requires_grad_(False)
    result.seconds = time.perf_counter() - t0
    return result
