"""The training loop the stages share: learning-rate schedule, step or time limits, shuffled batches."""

from __future__ import annotations

import logging
import math
import time

import torch

logger = logging.getLogger("train_demo_model")


def set_lr(
    optimizer: torch.optim.Optimizer, peak: float, progress: float, step: int, *, warmup: int, floor: float
) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay from `peak` to `floor` x peak as
    `progress` goes from 0 to 1."""
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    lr = peak * min(1.0, (step + 1) / warmup) * (floor + (1 - floor) * cosine)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def progress(step: int, steps: int, started: float, minutes: float) -> float:
    """How far a stage is: by steps, or by time when the time limit binds first (a slow machine
    still ends its schedule; on a fast one the step count decides, so runs repeat)."""
    return max(step / steps, (time.monotonic() - started) / (minutes * 60))


def shuffled_batches(count: int, steps: int, size: int, generator: torch.Generator):
    """`steps` batches of `size` indices into `count` items: epochs in a fresh random order each."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < size:
            order = torch.cat([order, torch.randperm(count, generator=generator)])
        batch, order = order[:size], order[size:]
        yield batch


def run_steps(
    name,
    optimizer,
    peak,
    steps,
    minutes,
    batches,
    loss_fn,
    *,
    warmup: int | None = None,
    floor: float = 0.0,
    clip: float | None = 1.0,
    log_every: int = 25,
) -> None:
    """A training loop: warm-up (`warmup` steps; default a tenth of the steps, at most 50) then cosine
    decay to `floor` x peak by step or time (see `progress`), grads clipped to norm `clip` unless None.
    loss_fn(batch) -> (loss, figures to log)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    warmup = warmup if warmup is not None else min(50, steps // 10 + 1)
    started = time.monotonic()
    for step, batch in enumerate(batches):
        done = progress(step, steps, started, minutes)
        lr = set_lr(optimizer, peak, done, step, warmup=warmup, floor=floor)
        loss, figures = loss_fn(batch)
        optimizer.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        if step % log_every == 0 or step == steps - 1 or done >= 1.0:
            logger.info(
                "%s step %d loss %.4f %s lr %.2e",
                name,
                step,
                loss.item(),
                " ".join(f"{f:.3f}" for f in figures),
                lr,
            )
        if done >= 1.0:
            logger.warning("%s stopped by its time limit at step %d of %d", name, step + 1, steps)
            break
