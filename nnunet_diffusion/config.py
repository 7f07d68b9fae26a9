"""Diffusion settings: one small frozen dataclass (ARCHITECTURE.md habit 5)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional

from nnunet_diffusion.schedule import BETA_END, BETA_START, NUM_BASE_LEVELS, Schedule

PREDICTIONS = ("x0", "eps")
SAMPLERS = ("ddpm", "ddim")
RECYCLE_SOURCES = ("next", "noise", "chain")
STARTS = ("noise", "zeros")
RECYCLE_LOSSES = ("mean", "sum")


def _check_int(name: str, value, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise ValueError(f"{name} must be an integer in [1, {high}], got {value!r}")


def _check_fraction(name: str, value, meaning: str) -> None:
    """``value`` a number (not a bool) in [0, 1]; ``meaning`` says what it is in the error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be {meaning} in [0, 1], got {value!r}")


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
        ``"chain"``: x_t is the sampling chain's own x_k, run without gradient from x_K through the chain's
        reverse steps down to the sample's level k (K - k network calls for that sample), so every level is
        trained on the inputs the chain gives it at inference (no exposure bias; not the paper's). It replaces
        the single recycle pass, so ``supervise_recycle`` and ``self_condition`` do not combine with it.
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
    ema_halflife: exponential moving average of the weights for validation, export and prediction, as a
        fraction of the training run: an update's weight halves after ``ema_halflife`` x (epochs x iterations
        per epoch) iterations, so the same value suits short and long budgets. 0: no average (the paper).
    self_condition: self-conditioning (Chen et al. 2022, "Analog Bits"): C more input channels carry the
        model's previous estimate x0_hat (in training: the estimate of a first, gradient-free pass on the same
        x_t for a random half of the batch, zeros for the other half; in the chain: the previous step's x0_hat,
        zeros at the first step). Not the paper's.
    noisiest_share: training only: the probability of drawing the noisiest level k = K for a sample (the level
        the chain's first step sees, pure noise: the image alone must give the mask); the other K - 1 levels
        share the rest equally. ``None``: uniform over the K levels (the paper, 1/K each).
    start: inference: what the chain starts from at level K. ``"noise"``: x_K ~ N(0, I) (the paper);
        ``"zeros"``: x_K = 0, the mean of that noise. At level K, x_K carries no information about the mask
        (alpha_bar_K ~ 4e-5), so the best prediction from it does not depend on it; zeros remove the variance a
        random draw adds to the chain's first estimate. Later steps still draw their noise (DDPM), the same
        draws as with ``"noise"`` (the starting draw is made and discarded), so the two are paired.
    zero_noisiest_input: training: at the noisiest level K the network's x_t input is zeros instead of the ground
        truth (or recycled estimate) noised to alpha_bar_K (pure noise), in the supervised and the recycle pass:
        the input the chain's first step gets with ``start = "zeros"``, so that step is trained as it is used.
    scale_mask_input: the network sees sqrt(abar_t) x_t instead of x_t (training and chain alike): the linear
        least-squares estimate of x0 from x_t for a unit-variance mask, so an input's size follows what it
        says about the mask (level 1: x_t unchanged; level K: x 0.006). The noise of the noisy levels then
        barely reaches the first convolution's features, which the image shares, while the informative levels
        keep their signal. Not the paper's; the self-conditioning channels are not scaled.
    time_conditioning: the network is told the level t (FiLM after every normalisation, METHOD.md section 2; the
        paper). False: no time path at all, the planned U-Net on the image and x_t alone, which must read the noise
        level from x_t (not the paper's). With one level (the image-only control) the time path is a learned
        constant per channel that the norms' own affine parameters could hold, so turning it off there measures
        only what its extra parameters do to training.
    stock_image_init: the first convolution's weights on the image channels start at the scale stock nnU-Net gives
        them (He initialisation with the image channels' fan-in, C_img x kernel volume) instead of the scale the
        planned initialisation gives a convolution with C_img + C (or + 2 C) inputs, which is sqrt(C_img / (C_img +
        C)) of it (half, for one image channel and 3 classes). The convolution is followed by a normalisation, so
        the untrained network's output is the same either way, but its training is not: the gradient of a weight
        before a normalisation scales as 1 / |w|, so SGD's relative step on those weights is (C_img + C) / C_img
        times stock's (4x). With ``zero_init_mask_input`` the untrained network is then stock's U-Net on the
        image, initialised as stock initialises it. Initialisation only (not the paper's; False keeps the paper's).

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
    ema_halflife: float = 0.0
    self_condition: bool = False
    noisiest_share: Optional[float] = None
    start: str = "noise"
    zero_noisiest_input: bool = False
    scale_mask_input: bool = False
    time_conditioning: bool = True
    stock_image_init: bool = False

    def __post_init__(self) -> None:
        _check_int("num_steps", self.num_steps, self.num_base_levels)
        if self.train_num_steps is not None:
            _check_int("train_num_steps", self.train_num_steps, self.num_base_levels)
        _check_choice("prediction", self.prediction, PREDICTIONS)
        _check_choice("sampler", self.sampler, SAMPLERS)
        _check_choice("recycle_source", self.recycle_source, RECYCLE_SOURCES)
        if self.recycle_source == "chain" and (self.supervise_recycle or self.self_condition):
            raise ValueError("recycle_source 'chain' replaces the recycle pass: it does not combine with "
                             "supervise_recycle or self_condition")
        _check_choice("start", self.start, STARTS)
        _check_choice("recycle_loss", self.recycle_loss, RECYCLE_LOSSES)
        if self.recycle_loss != "mean" and not self.supervise_recycle:
            raise ValueError("recycle_loss combines the losses of a supervised recycle pass: it needs "
                             "supervise_recycle=True")
        _check_int("average_last", self.average_last, self.num_steps)
        _check_fraction("ema_halflife", self.ema_halflife, "a fraction of the run")
        if self.noisiest_share is not None:
            _check_fraction("noisiest_share", self.noisiest_share, "None (uniform levels) or a probability")

    def inference_schedule(self, num_steps: Optional[int] = None) -> Schedule:
        return Schedule.resampled(num_steps or self.num_steps, self.num_base_levels, self.beta_start, self.beta_end)

    def training_schedule(self) -> Schedule:
        return Schedule.resampled(self.train_num_steps or self.num_steps, self.num_base_levels,
                                  self.beta_start, self.beta_end)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "DiffusionConfig":
        """The settings a checkpoint recorded. A field the checkpoint lacks was added after it was written and
        gets the paper's value, which is what the code did before the field existed."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown diffusion settings {unknown}: written by a newer nnunet-diffusion?")
        return cls(**values)


@dataclass(frozen=True)
class SamplingSettings:
    """How one prediction samples (inference only; the weights do not depend on it).

    num_steps: K' levels of the chain; sampler: "ddpm" or "ddim"; average_last: output = mean softmax of the
    last m steps' x0_hat; start: "noise" or "zeros" (x_K, see DiffusionConfig); seed: noise seed of the generator
    used when no noise is passed in (None: torch's global RNG).
    """

    num_steps: int
    sampler: str = "ddpm"
    average_last: int = 1
    seed: Optional[int] = 0
    start: str = "noise"

    def __post_init__(self) -> None:
        _check_int("num_steps", self.num_steps, NUM_BASE_LEVELS)
        _check_choice("sampler", self.sampler, SAMPLERS)
        _check_choice("start", self.start, STARTS)
        _check_int("average_last", self.average_last, self.num_steps)

    @classmethod
    def from_config(cls, config: DiffusionConfig, **overrides) -> "SamplingSettings":
        """The trained settings, with any of ``overrides`` (None values keep the trained setting)."""
        values = {"num_steps": config.num_steps, "sampler": config.sampler, "average_last": config.average_last,
                  "start": config.start}
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "average_last" not in overrides or overrides["average_last"] is None:
            values["average_last"] = min(values["average_last"], values["num_steps"])
        return cls(**values)
