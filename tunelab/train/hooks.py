"""Fine-tuning modes that act at every optimizer step, as `StepHook`s the loop calls (see loop.StepHook).

AdaLoRA reallocates rank between layers from each weight's gradient sensitivity, so PEFT's
`update_and_allocate` runs after `optimizer.step()` and before the gradients are cleared. The step it is
given is the optimizer-step count (the LR schedule's), which is what `total_step` in its config counts too:
with RL methods one loop step takes several optimizer steps.
"""

from __future__ import annotations

from tunelab.config import RunConfig
from tunelab.train.loop import LoopContext, StepHook


class AdaLoraRankStep:
    def on_optimizer_step(self, ctx: LoopContext) -> None:
        ctx.unwrap().base_model.update_and_allocate(int(ctx.scheduler.last_epoch))


def finetune_hooks(cfg: RunConfig) -> list[StepHook]:
    """The step hooks a run's fine-tuning mode needs (none for most)."""
    return [AdaLoraRankStep()] if cfg.finetune == "adalora" else []
