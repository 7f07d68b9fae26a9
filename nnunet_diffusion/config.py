"""Diffusion settings: one small frozen dataclass (ARCHITECTURE.md habit 5)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from nnunet_diffusion.schedule import BETA_END, BETA_START, NUM_BASE_LEVELS, Schedule

PREDICTIONS = ("x0", "eps")
SAMPLERS = ("ddpm", "ddim")


@dataclass(frozen=True)
class DiffusionConfig:
    """Everything that defines a diffusion model beyond nnU-Net's plans.

    num_steps: K, the resampled chain used for inference (and for training unless
        ``train_num_steps`` says otherwise).
    train_num_steps: K used to draw training levels; ``None`` means ``num_steps``
        (the paper's default: train and infer on the same 5-level chain).
    recycle: build the noisy training mask from the model's own prediction (eq. 8-9).
    prediction: ``"x0"`` (the network predicts the mask) or ``"eps"`` (the noise).
    use_dice: add nnU-Net's Dice loss to cross-entropy.
    mse_weight: weight of MSE(eps_hat, eps) when ``prediction == "eps"``.
    sampler: ``"ddpm"`` or ``"ddim"`` (eta = 0) for the reverse process.
    """

    num_steps: int = 5
    train_num_steps: Optional[int] = None
    recycle: bool = True
    prediction: str = "x0"
    use_dice: bool = True
    mse_weight: float = 0.1
    sampler: str = "ddpm"
    num_base_levels: int = NUM_BASE_LEVELS
    beta_start: float = BETA_START
    beta_end: float = BETA_END

    def __post_init__(self) -> None:
        for name in ("num_steps", "train_num_steps"):
            value = getattr(self, name)
            if value is None and name == "train_num_steps":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= self.num_base_levels:
                raise ValueError(f"{name} must be an integer in [1, {self.num_base_levels}], got {value!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")

    def inference_schedule(self, num_steps: Optional[int] = None) -> Schedule:
        return Schedule.resampled(num_steps or self.num_steps, self.num_base_levels, self.beta_start, self.beta_end)

    def training_schedule(self) -> Schedule:
        return Schedule.resampled(self.train_num_steps or self.num_steps, self.num_base_levels,
                                  self.beta_start, self.beta_end)

    def to_dict(self) -> dict:
        return asdict(self)
