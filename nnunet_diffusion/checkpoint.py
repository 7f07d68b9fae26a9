"""Checkpoints: reading, atomic writing, the recorded diffusion settings, and the released weights' digest.

A checkpoint records the ``DiffusionConfig`` it was trained with (``checkpoint["diffusion"]``, ``to_dict``'s
fields). Settings recorded by earlier versions are read by :func:`recorded_config`:

* a field added later is missing and gets the paper's value (what the code did before the field existed);
* a field removed since (the accuracy study's candidates that were not adopted) is accepted when its value does not
  change what the trained weights predict (:data:`REMOVED_FIELDS`) and dropped; any other value is refused with a
  message naming the field.

:data:`FORMER_DEFAULTS` records the settings of the trainers that were ``DiffusionTrainer``'s default (or a
candidate for it) before the study's classes left the package, so their checkpoints still predict
(``trainers/former_defaults.py`` gives nnU-Net a trainer of that name, built from this table).

A released model's ``network_weights`` carry one extra entry, :data:`DIGEST_KEY`: the SHA-256 of every other entry
(name, dtype, shape and bytes, in name order); :func:`verify_and_strip` checks and removes it, and the network
nnU-Net builds applies it to every state dict it loads (``trainer.DiffusionTrainer.build_network_architecture``).
"""
from __future__ import annotations

import hashlib
import os
from typing import Dict, Mapping

import torch

from nnunet_diffusion.config import DiffusionConfig

DIGEST_KEY = "_release_weights_sha256"
# checkpoint entries a released model keeps (nnU-Net's predictors need the first four)
KEPT = ("network_weights", "init_args", "trainer_name", "inference_allowed_mirroring_axes", "diffusion",
        "current_epoch")

ANY = object()  # a removed field that only acted in training: any recorded value predicts the same
# removed fields: the value with which a checkpoint predicts as the shipped network does (ANY: training only)
REMOVED_FIELDS: Dict[str, object] = {
    "ema_halflife": ANY,  # network_weights already hold the average
    "noisiest_share": ANY,
    "zero_noisiest_input": ANY,
    "stock_image_init": ANY,  # initialisation only
    "self_condition": False,  # True: C more input channels and another chain
    "scale_mask_input": False,  # True: another network input
    "time_conditioning": True,  # False: no time path
    "start": "noise",  # "zeros": another chain
}
# removed values of kept fields that only acted in training, and the kept value they read as
REMOVED_VALUES: Dict[str, Dict[object, object]] = {"recycle_source": {"chain": "next"}}

# trainer name -> its recorded settings, as changes to the paper's (``DiffusionConfig()``)
FORMER_DEFAULTS: Dict[str, Dict[str, object]] = {
    # the zero-init default of 2026-11-29, before the mean of the steps and the EMA joined it
    "DiffusionTrainer_zeroInitMaskInput": {"zero_init_mask_input": True},
    # the default of 2026-11-29
    "DiffusionTrainer_zeroInitChainMeanEma": {"zero_init_mask_input": True, "average_last": 5, "ema_halflife": 0.05},
    # the default of 2026-11-30
    "DiffusionTrainer_zeroInitChainMean": {"zero_init_mask_input": True, "average_last": 5},
    # the candidate adopted as the default on 2026-12-01 (DiffusionTrainer's settings since)
    "DiffusionTrainer_noisePassSum": {"zero_init_mask_input": True, "average_last": 5, "supervise_recycle": True,
                                      "recycle_source": "noise", "recycle_loss": "sum"},
}

# settings that only decide how a network is initialised: trained weights mean the same whatever they were
INITIALISATION_ONLY = frozenset({"zero_init_mask_input"})
# settings that only decide what the trained network's chain returns (never used in training): the loading
# trainer's value applies, as nnUNetv2_predict_diffusion --average-last overrides it too
OUTPUT_ONLY = frozenset({"average_last"})
NOT_REFUSED = INITIALISATION_ONLY | OUTPUT_ONLY  # a checkpoint may differ from its trainer in these


class ChecksumError(RuntimeError):
    pass


# ------------------------------------------------------------------ settings
def recorded_config(checkpoint_or_settings: Mapping, source: str = "the checkpoint") -> DiffusionConfig:
    """The ``DiffusionConfig`` a checkpoint (or its ``diffusion`` dict) recorded, read as the module docstring
    says; ValueError for a checkpoint without settings, an unknown field, or a removed one that would change the
    prediction."""
    is_checkpoint = "diffusion" in checkpoint_or_settings or "network_weights" in checkpoint_or_settings
    settings = checkpoint_or_settings.get("diffusion") if is_checkpoint else checkpoint_or_settings
    if settings is None:
        raise ValueError(f"{source} holds no diffusion settings: it was not written by a DiffusionTrainer "
                         f"(trainer {checkpoint_or_settings.get('trainer_name')!r}).")
    kept = {}
    for name, value in settings.items():
        if name in REMOVED_FIELDS:
            harmless = REMOVED_FIELDS[name]
            if harmless is not ANY and value != harmless:
                raise ValueError(f"{source} was trained with {name}={value!r}, a setting of the accuracy study that "
                                 f"left the package (it changes what the weights predict; only {name}="
                                 f"{harmless!r} is read). Predict it with the commit that trained it (see "
                                 f"git history of nnunet_diffusion/variants.py).")
            continue
        kept[name] = REMOVED_VALUES.get(name, {}).get(value, value)
    return DiffusionConfig.from_dict(kept)


def former_default_config(name: str) -> DiffusionConfig:
    """The settings of a former default (:data:`FORMER_DEFAULTS`), read as a checkpoint of it records them."""
    if name not in FORMER_DEFAULTS:
        raise KeyError(f"{name!r} is not a former default ({', '.join(FORMER_DEFAULTS)})")
    return recorded_config({**DiffusionConfig().to_dict(), **FORMER_DEFAULTS[name]}, name)


def check_diffusion_settings(checkpoint: Mapping, expected: DiffusionConfig, source: str) -> DiffusionConfig:
    """Refuse a checkpoint whose recorded diffusion settings differ from ``expected`` (settings that only decide
    the initialisation, :data:`INITIALISATION_ONLY`, or the chain's output, :data:`OUTPUT_ONLY`, may differ).
    Returns the recorded settings."""
    recorded = recorded_config(checkpoint, source)
    saved, want = recorded.to_dict(), expected.to_dict()
    diff = {k: (saved[k], v) for k, v in want.items() if saved[k] != v and k not in NOT_REFUSED}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs trainer {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"{source} was trained with other diffusion settings ({detail}); refusing to load it. "
                         f"Use the trainer it was trained with (checkpoint trainer: "
                         f"{checkpoint.get('trainer_name')!r}, with a budget suffix such as _12ep50it if it was "
                         f"trained with one).")
    return recorded


# ------------------------------------------------------------------ files
def atomic_torch_save(obj: dict, filename: str) -> None:
    """torch.save to ``filename`` via a temporary file in the same folder and an atomic rename."""
    folder, base = os.path.split(os.path.abspath(filename))
    for stale in os.listdir(folder):  # left by a process killed while saving
        if stale.startswith(base + ".tmp"):
            os.remove(os.path.join(folder, stale))
    tmp = f"{filename}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filename)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_checkpoint(filename: str) -> dict:
    """Load a checkpoint on the CPU, turning unreadable files into a clear error."""
    try:
        checkpoint = torch.load(filename, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise RuntimeError(f"checkpoint {filename} is corrupt or truncated and cannot be loaded "
                           f"({type(e).__name__}: {e}). Use another checkpoint or retrain.") from e
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise RuntimeError(f"{filename} is not an nnU-Net checkpoint (no 'network_weights').")
    return checkpoint


def raw_weights(checkpoint_file: str) -> dict:
    """The trained (not averaged) weights a checkpoint keeps beside its weight average; a clear error for a
    checkpoint without an average (its ``network_weights`` are the trained weights) or a released one."""
    checkpoint = read_checkpoint(checkpoint_file)
    if "training_network_weights" not in checkpoint:
        raise ValueError(f"{checkpoint_file} keeps no separate trained weights: its trainer "
                         f"({checkpoint.get('trainer_name')!r}) kept no moving average of the weights (its "
                         f"network_weights are the trained weights), or it is a released checkpoint, which keeps "
                         f"only the average. Use --weights average.")
    return checkpoint["training_network_weights"]


# ------------------------------------------------------------------ released weights
def _raw_bytes(t: torch.Tensor) -> bytes:
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def weights_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of the entries of a state dict other than :data:`DIGEST_KEY`: name, dtype, shape and the
    raw bytes of each tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(k for k in state_dict if k != DIGEST_KEY):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(_raw_bytes(t))
    return h.hexdigest()


def digest_tensor(hex_digest: str) -> torch.Tensor:
    return torch.tensor(list(bytes.fromhex(hex_digest)), dtype=torch.uint8)


def verify_and_strip(state_dict: Mapping[str, torch.Tensor], source: str = "the weights") -> Mapping:
    """Without :data:`DIGEST_KEY`: ``state_dict`` unchanged. With it: the other entries, after checking that
    their digest is the recorded one (:class:`ChecksumError` otherwise)."""
    if DIGEST_KEY not in state_dict:
        return state_dict
    recorded = bytes(state_dict[DIGEST_KEY].to(torch.uint8).tolist()).hex()
    found = weights_digest(state_dict)
    if found != recorded:
        raise ChecksumError(f"{source}: SHA-256 of the network weights is {found}, the released model recorded "
                            f"{recorded}: the checkpoint is corrupted. Download or install the model again.")
    return {k: v for k, v in state_dict.items() if k != DIGEST_KEY}


def released_checkpoint(checkpoint: Mapping, half: bool = False) -> Dict:
    """The weights-only checkpoint of a release: the entries of :data:`KEPT` and the weights' digest."""
    missing = [k for k in ("network_weights", "init_args", "trainer_name", "inference_allowed_mirroring_axes")
               if k not in checkpoint]
    if missing:
        raise ValueError(f"the checkpoint lacks {missing}: not a finished nnU-Net checkpoint")
    # nnU-Net's U-Nets register the encoder twice (encoder.* and decoder.encoder.*): entries with equal content
    # become one tensor, which torch.save writes once (loading copies the values into each parameter)
    converted: Dict = {}
    weights: Dict[str, torch.Tensor] = {}
    for k, v in checkpoint["network_weights"].items():
        if k == DIGEST_KEY:
            continue
        v = v.detach().cpu().contiguous()
        v = v.half() if half and v.is_floating_point() else v
        key = (str(v.dtype), tuple(v.shape), hashlib.sha256(_raw_bytes(v)).digest())
        weights[k] = converted.setdefault(key, v)
    weights[DIGEST_KEY] = digest_tensor(weights_digest(weights))
    out = {k: checkpoint[k] for k in KEPT if k in checkpoint}
    out["network_weights"] = weights
    return out
