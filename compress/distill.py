"""Policy distillation (Rusu et al. 2016): train a small student to match a teacher's action distribution.

The student minimises KL(softmax(teacher / T) || softmax(student / T)) on states from a replay of
teacher-labelled observations (``DistillBuffer``). Which states go into the buffer follows DAgger
(Ross et al. 2011): with probability ``beta(iteration)`` the teacher acts while collecting, otherwise
the student does, and ``beta`` decays to 0 so that the student is finally trained on the states its
own mistakes lead to. Every state is labelled by the teacher, whoever acted.

DQN teachers have Q-values, not logits: ``teacher_logits_from_q`` turns them into the sharpened
distribution softmax(Q / tau) that Rusu et al. distil (tau = 0.01 worked best for them), stored as
log-probabilities so that the buffer and the loss treat both kinds of teachers alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def kl_from_targets(
    student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(target || softmax(student / T)), averaged over the batch: (B, A), (B, A) -> scalar.

    Targets with zero entries are fine (0 log 0 = 0).
    """
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(log_student, target_probs.float(), reduction="batchmean")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    scale_t2: bool = False,
) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch: (B, A), (B, A) -> scalar.

    Zero exactly when the two softmaxes agree, positive otherwise. Hinton et al. (2015) multiply by T^2
    so that gradients keep their size across temperatures when the soft loss is mixed with a hard-label
    loss. Policy distillation trains on this loss alone, where T^2 would only rescale the learning rate,
    so the factor is off by default; ``scale_t2=True`` applies it.

    Args:
        student_logits: (B, A) raw student outputs.
        teacher_logits: (B, A) teacher logits (or log-probabilities; no gradient flows into them).
        temperature: T > 0; above 1 softens both distributions and shows the student the teacher's
            ranking of the non-greedy actions.
        scale_t2: Multiply the loss by T^2.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    targets = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    loss = kl_from_targets(student_logits, targets, temperature)
    return loss * temperature**2 if scale_t2 else loss


def teacher_targets_from_q(q_values: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Action distribution of a DQN teacher, softmax(Q / tau): (B, A) -> (B, A) probabilities.

    A small tau (Rusu et al.: 0.01) sharpens the distribution towards the greedy action while keeping the
    order of near-ties; Q-values themselves are on the scale of returns, not of logits.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return F.softmax(q_values.detach().float() / temperature, dim=-1)


def teacher_logits_from_q(q_values: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """log softmax(Q / tau): (B, A) -> (B, A); logits whose softmax is ``teacher_targets_from_q``.

    Store these in ``DistillBuffer`` and distil with ``temperature=1`` to train on softmax(Q / tau).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return F.log_softmax(q_values.detach().float() / temperature, dim=-1)


def beta(iteration: int, decay: float = 0.5, zero_after: int = 10) -> float:
    """DAgger mixing: probability that the teacher acts during collection iteration ``iteration`` (from 0).

    beta_i = decay ** i (Ross et al. 2011): 1 at first, when the student is untrained and its states
    are meaningless, then exponentially less, and exactly 0 from ``zero_after`` on, so the last
    iterations collect the student's own state distribution.
    """
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    if zero_after < 1:
        raise ValueError(f"zero_after must be >= 1, got {zero_after}")
    return 0.0 if iteration >= zero_after else decay**iteration


class DistillStats(NamedTuple):
    """One distillation step.

    Attributes:
        loss: The distillation loss (with T^2 if requested) before the step.
        agreement: Fraction of the batch where the student's greedy action is the teacher's, in [0, 1].
        student_entropy: Mean entropy (nats) of softmax(student) at T = 1.
        grad_norm: Gradient norm before clipping.
        value_loss: Mean squared error of the student's values against the teacher's (0 without them).
    """

    loss: float
    agreement: float
    student_entropy: float
    grad_norm: float
    value_loss: float = 0.0


def _split(output: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    # Actor-critic modules return (logits, value); Q-networks and plain policies the logits alone.
    if isinstance(output, tuple | list):
        return output[0], (output[1] if len(output) > 1 else None)
    return output, None


def distill_step(
    student: nn.Module,
    teacher_logits: torch.Tensor,
    obs: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    temperature: float = 1.0,
    max_grad_norm: float | None = None,
    scale_t2: bool = False,
    logits_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    teacher_values: torch.Tensor | None = None,
    value_coef: float = 0.0,
) -> DistillStats:
    """One gradient step of the student on a minibatch of teacher-labelled observations.

    Args:
        student: Maps obs (B, *obs_shape) to logits (B, A), or to a tuple whose first item is the logits.
        teacher_logits: (B, A) teacher logits (``teacher_logits_from_q`` for a DQN teacher).
        obs: (B, *obs_shape) observations, e.g. uint8 frames (the encoders scale them).
        optimizer: Over the student's parameters.
        temperature: Distillation temperature T.
        max_grad_norm: Clip the gradient norm to this; None leaves it.
        scale_t2: See ``distillation_loss``.
        logits_fn: ``logits_fn(student, obs)`` -> (B, A) when the student needs another call
            (a recurrent state, a time axis); default ``student(obs)``.
        teacher_values: (B,) the teacher's state values; with ``value_coef > 0`` and a student that
            returns (logits, values), the student's values regress on them (mean squared error).
        value_coef: Weight of that value loss in the gradient.
    """
    student.train()
    if logits_fn is not None:
        logits, values = logits_fn(student, obs), None
    else:
        logits, values = _split(student(obs))
    loss = distillation_loss(logits, teacher_logits, temperature, scale_t2)
    value_loss = torch.zeros(())
    if teacher_values is not None and values is not None and value_coef > 0:
        value_loss = F.mse_loss(values.float(), teacher_values.float())
    optimizer.zero_grad(set_to_none=True)
    (loss + value_coef * value_loss).backward()
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    clip = math.inf if max_grad_norm is None else max_grad_norm
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)  # with inf: only measures the norm
    optimizer.step()
    with torch.no_grad():
        agreement = (logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean()
        log_p = F.log_softmax(logits.float(), dim=-1)
        entropy = -(log_p.exp() * log_p).sum(-1).mean()
    return DistillStats(loss.item(), float(agreement), float(entropy), float(grad_norm), value_loss.item())


class DistillBatch(NamedTuple):
    """obs (B, *obs_shape) in the buffer's dtype; teacher_logits (B, A) fp32; teacher_values (B,) fp32
    when the buffer keeps values, else None."""

    obs: torch.Tensor
    teacher_logits: torch.Tensor
    teacher_values: torch.Tensor | None = None


class DistillBuffer:
    """Fixed-size ring of observations and the teacher's logits on them; the oldest are overwritten.

    Args:
        capacity: Number of observations kept.
        obs_shape: Shape of one observation, e.g. (4, 84, 84).
        num_actions: Width of the teacher's logits.
        obs_dtype: Storage dtype; uint8 frames take a quarter of fp32's memory (100k Mario stacks: 2.8 GB).
        seed: Seed of the sampling generator.
        with_values: Also keep the teacher's state value of each observation.
    """

    def __init__(
        self,
        capacity: int,
        obs_shape: tuple[int, ...],
        num_actions: int,
        obs_dtype: torch.dtype = torch.uint8,
        seed: int = 0,
        with_values: bool = False,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.obs = torch.zeros((capacity, *obs_shape), dtype=obs_dtype)
        self.teacher_logits = torch.zeros((capacity, num_actions), dtype=torch.float32)
        self.teacher_values = torch.zeros(capacity, dtype=torch.float32) if with_values else None
        self.position = 0  # next slot to write
        self.size = 0
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.size

    def add(
        self,
        obs: torch.Tensor | np.ndarray,
        teacher_logits: torch.Tensor | np.ndarray,
        teacher_values: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        """Appends a batch: obs (B, *obs_shape), teacher_logits (B, A), teacher_values (B,) when the
        buffer keeps values; B may exceed the capacity."""
        obs = torch.as_tensor(obs).detach().cpu()
        logits = torch.as_tensor(teacher_logits).detach().cpu().float()
        if obs.shape[1:] != self.obs.shape[1:] or logits.shape != (len(obs), self.teacher_logits.shape[1]):
            raise ValueError(
                f"expected obs (B, {', '.join(map(str, self.obs.shape[1:]))}) and logits (B, "
                f"{self.teacher_logits.shape[1]}), got {tuple(obs.shape)} and {tuple(logits.shape)}"
            )
        if (teacher_values is None) != (self.teacher_values is None):
            keeps = "keeps" if self.teacher_values is not None else "does not keep"
            raise ValueError(f"this DistillBuffer {keeps} teacher values; pass teacher_values accordingly")
        values = None
        if teacher_values is not None:
            values = torch.as_tensor(teacher_values).detach().cpu().float()
            if values.shape != (len(obs),):
                raise ValueError(f"expected teacher_values ({len(obs)},), got {tuple(values.shape)}")
            values = values[-self.capacity :]
        obs, logits = obs[-self.capacity :], logits[-self.capacity :]  # older items would be overwritten
        slots = (self.position + torch.arange(len(obs))) % self.capacity
        self.obs[slots] = obs.to(self.obs.dtype)
        self.teacher_logits[slots] = logits
        if self.teacher_values is not None:
            self.teacher_values[slots] = values
        self.position = (self.position + len(obs)) % self.capacity
        self.size = min(self.size + len(obs), self.capacity)

    def sample(self, batch_size: int) -> DistillBatch:
        """A uniform minibatch (with replacement) of the stored items."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty DistillBuffer")
        index = torch.randint(self.size, (batch_size,), generator=self.generator)
        values = None if self.teacher_values is None else self.teacher_values[index]
        return DistillBatch(self.obs[index], self.teacher_logits[index], values)
