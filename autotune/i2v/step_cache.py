"""Step cache (TeaCache / First-Block-Cache style): skip the transformer on steps whose input
barely moved since the last step that ran it, and reuse what that step produced.

What is measured. TeaCache decides from the timestep-modulated input of the first block, and
First-Block-Cache from the first block's output residual: both need to see inside the
transformer. A compiled monolithic transformer is one opaque call, so we use the change of what
goes IN to it, which is all it depends on besides the fixed text/image context:

    d_i = mean|x_i - x_{i-1}| / mean|x_{i-1}|  +  |t_i - t_{i-1}| / num_train_timesteps

x is the 16 noise-latent channels (the 20 condition channels are the same at every step) and t
the timestep. d_i is accumulated over consecutive steps since the transformer last ran; while
the sum stays under the threshold the step is skipped, otherwise the transformer runs and the
sum restarts at 0. The first `keep_first` steps and the last step always run. The timestep term
makes the indicator move even when the latents happen not to (the model's output depends on t).

What is reused (`reuse`):
  * "output":   noise_pred_i = noise_pred_last. For flow matching (Wan) the model predicts a
                velocity that is nearly constant along a straight trajectory, so this is the
                natural first-order guess.
  * "residual": noise_pred_i = x_i + (noise_pred_last - x_last), TeaCache's residual reuse
                transplanted to the whole model.
The default ("output") was the more faithful one on the tiny model (see tools/results/pipeline.md).
With classifier-free guidance the decision is shared and each branch reuses its own prediction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

REUSE_MODES = ("output", "residual")


def relative_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean|a - b| / mean|b| (0 when b is all zeros and a == b)."""
    denom = float(b.abs().mean())
    diff = float((a - b).abs().mean())
    return diff / denom if denom > 0 else (0.0 if diff == 0 else float("inf"))


@dataclass
class StepCacheStats:
    threshold: float
    reuse: str
    steps: int = 0
    computed: int = 0
    skipped_steps: list[int] = field(default_factory=list)
    indicators: list[float] = field(default_factory=list)  # d_i per step (0 for the first)

    @property
    def skipped(self) -> int:
        return len(self.skipped_steps)

    def to_json(self) -> dict:
        return {
            "threshold": self.threshold, "reuse": self.reuse, "steps": self.steps, "computed": self.computed,
            "skipped": self.skipped, "skipped_steps": list(self.skipped_steps),
            "indicators": [round(d, 6) for d in self.indicators],
        }

    def summary(self) -> str:
        return (
            f"step cache (threshold {self.threshold:g}, reuse {self.reuse}): {self.skipped}/{self.steps} transformer "
            f"steps skipped {self.skipped_steps or ''}".rstrip()
        )


class StepCache:
    """Decide per step whether the transformer runs; remember and reuse its predictions."""

    def __init__(self, threshold: float, reuse: str = "output", keep_first: int = 1, keep_last: bool = True,
                 num_train_timesteps: int = 1000):
        if threshold < 0:
            raise ValueError(f"step cache threshold must be >= 0, got {threshold}")
        if reuse not in REUSE_MODES:
            raise ValueError(f"step cache reuse must be one of {REUSE_MODES}, got {reuse!r}")
        self.threshold = float(threshold)
        self.reuse_mode = reuse
        self.keep_first = max(1, int(keep_first))
        self.keep_last = keep_last
        self.num_train_timesteps = num_train_timesteps
        self.reset(0)

    def reset(self, num_steps: int) -> None:
        self.num_steps = num_steps
        self.stats = StepCacheStats(self.threshold, self.reuse_mode, steps=num_steps)
        self._prev_x: torch.Tensor | None = None
        self._prev_t: float | None = None
        self._accumulated = 0.0
        self._last: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # branch -> (x, noise_pred)

    def should_compute(self, i: int, x: torch.Tensor, t: float) -> bool:
        """Call once per step, before the transformer; True: run it, False: call `reuse`."""
        if self._prev_x is None:
            d = 0.0
        else:
            d = relative_l1(x, self._prev_x) + abs(float(t) - self._prev_t) / self.num_train_timesteps
        self.stats.indicators.append(d)
        self._prev_x, self._prev_t = x.detach().clone(), float(t)
        self._accumulated += d
        forced = i < self.keep_first or (self.keep_last and i == self.num_steps - 1) or not self._last
        if forced or self._accumulated >= self.threshold:
            self._accumulated = 0.0
            self.stats.computed += 1
            return True
        self.stats.skipped_steps.append(i)
        return False

    def store(self, branch: str, x: torch.Tensor, noise_pred: torch.Tensor) -> None:
        self._last[branch] = (x.detach().clone(), noise_pred.detach().clone())

    def reuse(self, branch: str, x: torch.Tensor) -> torch.Tensor:
        last_x, last_pred = self._last[branch]
        if self.reuse_mode == "output":
            return last_pred.clone()
        return x + (last_pred - last_x)
