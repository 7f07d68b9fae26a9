"""Diffusion settings: one small frozen dataclass (ARCHITECTURE.md habit 5)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional

from nnunet_diffusion.schedule import BETA_END, BETA_START, NUM_BASE_LEVELS, Schedule

PREDICTIONS = ("x0", "eps")
SAMPLERS = ("ddpm", "ddim")
RECYCLE_SOURCES = ("next", "noise")
RECYCLE_LOSSES = ("mean", "sum")


def _check_int(name: str, value, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise ValueError(f"{name} must be an integer in [1, {high}], got {value!r}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


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
    recycle_source: where the recycle pass starts. ``"next"`` (the paper, eq. 8-9): the ground truth noised
        to the next noisier level k' = min(k + 1, K). ``"noise"``: level K for every sample, i.e. what the
        sampling chain's first step sees (pure noise), so x_t is built from the prediction the chain starts from.
    supervise_recycle: the recycle pass is also supervised (Dice + CE, with gradient); its x0_hat is still
        detached before it builds x_t (the stop-gradient of eq. 9). The loss combines the two passes' losses as
        ``recycle_loss`` says.
    recycle_loss: with ``supervise_recycle``, how the two passes' losses combine. ``"mean"``: their mean (each pass
        weighs half a training step). ``"sum"``: their sum, so each pass gets the gradient of a whole training step
        on the batch; with ``recycle_source = "noise"`` the recycle pass is then stock nnU-Net's training step (the
        image alone must give the mask; the zero-initialised x_t weights see pure noise) and the level-k pass comes
        on top of it. Not the paper's (it has no supervised recycle pass).
    average_last: m, inference: the segmentation is the mean softmax probability of the x0_hat estimates of
        the chain's last m steps (1: the last step's logits, the paper).
    zero_init_mask_input: initialise the first convolution's weights on the C mask channels (x_t) to zero, so
        the untrained network sees only the image, like stock nnU-Net's, instead of three quarters noise at the
        noisiest levels; the weights then grow only where x_t carries signal. Initialisation only (not the
        paper's; its default False keeps the paper's initialisation).

    The defaults are the paper's configuration; ``DiffusionTrainer`` may use another (see trainer.py).
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
    recycle_source: str = "next"
    supervise_recycle: bool = False
    recycle_loss: str = "mean"
    average_last: int = 1
    zero_init_mask_input: bool = False

    def __post_init__(self) -> None:
        _check_int("num_steps", self.num_steps, self.num_base_levels)
        if self.train_num_steps is not None:
            _check_int("train_num_steps", self.train_num_steps, self.num_base_levels)
        _check_choice("prediction", self.prediction, PREDICTIONS)
        _check_choice("sampler", self.sampler, SAMPLERS)
        _check_choice("recycle_source", self.recycle_source, RECYCLE_SOURCES)
        _check_choice("recycle_loss", self.recycle_loss, RECYCLE_LOSSES)
        if self.recycle_loss != "mean" and not self.supervise_recycle:
            raise ValueError("recycle_loss combines the losses of a supervised recycle pass: it needs "
                             "supervise_recycle=True")
        _check_int("average_last", self.average_last, self.num_steps)

    def inference_schedule(self, num_steps: Optional[int] = None) -> Schedule:
        return Schedule.resampled(num_steps or self.num_steps, self.num_base_levels, self.beta_start, self.beta_end)

    def training_schedule(self) -> Schedule:
        return Schedule.resampled(self.train_num_steps or self.num_steps, self.num_base_levels,
                                  self.beta_start, self.beta_end)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "DiffusionConfig":
        """Settings from a dict of fields (``to_dict``'s). A field the dict lacks gets the paper's value. Settings
        a checkpoint recorded go through ``checkpoint.recorded_config``, which also reads fields removed since."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown diffusion settings {unknown}: written by a newer nnunet-diffusion?")
        return cls(**values)


@dataclass(frozen=True)
class SamplingSettings:
    """How one prediction samples (inference only; the weights do not depend on it).

    num_steps: K' levels of the chain; sampler: "ddpm" or "ddim"; average_last: output = mean softmax of the
    last m steps' x0_hat, m in [1, K']; seed: noise seed of the generator used when no noise is passed in (None:
    torch's global RNG).
    """

    num_steps: int
    sampler: str = "ddpm"
    average_last: int = 1
    seed: Optional[int] = 0

    def __post_init__(self) -> None:
        _check_int("num_steps", self.num_steps, NUM_BASE_LEVELS)
        _check_choice("sampler", self.sampler, SAMPLERS)
        _check_int("average_last", self.average_last, self.num_steps)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {self.seed!r}")

    @classmethod
    def from_config(cls, config: DiffusionConfig, **overrides) -> "SamplingSettings":
        """The trained settings with any of ``overrides`` (None values keep the trained setting). The trained m
        (``average_last``) is kept when it fits the chain; with fewer steps than it, every step is averaged."""
        given = {k: v for k, v in overrides.items() if v is not None}
        num_steps = given.get("num_steps", config.num_steps)
        values = {"num_steps": num_steps, "sampler": config.sampler,
                  "average_last": min(config.average_last, num_steps) if isinstance(num_steps, int) else 1}
        values.update(given)
        return cls(**values)
