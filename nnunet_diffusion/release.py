"""Released models: a trained model folder as a compact zip that nnU-Net's own installer accepts, with a checksum
of the weights that is verified whenever they are loaded.

``nnunet-diffusion release -d 4 -c 3d_fullres -f all -tr DiffusionTrainer -o model.zip [--half]`` writes

    Dataset004_Hippocampus/DiffusionTrainer__nnUNetPlans__3d_fullres/
        plans.json  dataset.json  dataset_fingerprint.json  release.json
        fold_all/checkpoint_final.pth     (weights only: no optimizer state, no raw pre-average weights)

(the layout of ``nnUNetv2_export_model_to_zip``, so ``nnUNetv2_install_pretrained_model_from_zip model.zip``
installs it into ``nnUNet_results``) and ``model.zip.sha256`` (``sha256sum -c`` format) for the file itself.

The checkpoint's ``network_weights`` carry one extra entry, :data:`DIGEST_KEY`: the SHA-256 of every other
entry (name, dtype, shape and bytes, in name order). ``DiffusionUNet.load_state_dict`` removes it and refuses
weights whose digest differs, so a corrupted copy is refused by every command that loads it
(``nnUNetv2_predict``, ``nnUNetv2_predict_diffusion``, training from it) with an error that says so.
``--half`` stores floating-point weights as float16 (half the size; they are cast back to float32 on loading,
which changes predictions slightly: compare before shipping).
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from typing import Dict, Mapping, Optional

import torch

DIGEST_KEY = "_release_weights_sha256"
# checkpoint entries a released model keeps (nnU-Net's predictors need the first four)
KEPT = ("network_weights", "init_args", "trainer_name", "inference_allowed_mirroring_axes", "diffusion",
        "current_epoch")


class ChecksumError(RuntimeError):
    pass


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


def verify_and_strip(state_dict: Mapping[str, torch.Tensor], source: str = "the weights") -> Dict:
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


def released_checkpoint(checkpoint: Dict, half: bool = False) -> Dict:
    """The weights-only checkpoint of a release: the entries of :data:`KEPT` and the weights' digest."""
    missing = [k for k in ("network_weights", "init_args", "trainer_name", "inference_allowed_mirroring_axes")
               if k not in checkpoint]
    if missing:
        raise ValueError(f"the checkpoint lacks {missing}: not a finished nnU-Net checkpoint")
    # nnU-Net's U-Nets register the encoder twice (encoder.* and decoder.encoder.*), and a weight average holds
    # both copies: entries with equal content become one tensor, which torch.save writes once (loading copies
    # the values into each parameter, so sharing in the file changes nothing)
    converted: Dict = {}
    weights = {}
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


def release_model(model_folder: str, fold: str, out_zip: str, checkpoint_name: str = "checkpoint_final.pth",
                  half: bool = False, notes: Optional[Dict] = None, overwrite: bool = False,
                  as_fold: Optional[str] = None, as_trainer: Optional[str] = None) -> Dict:
    """Write the release zip of ``model_folder/fold_{fold}`` (see the module docstring) and its ``.sha256``.
    ``as_fold`` / ``as_trainer``: the fold and trainer name the installed model has (e.g. a model trained as
    ``DiffusionTrainer_30ep100it`` on a custom split, released as ``DiffusionTrainer`` fold ``all``: a budget
    suffix changes the training length only, and the trainer's diffusion settings are still checked on loading).
    Returns release.json's content."""
    from nnunet_diffusion.trainer import read_checkpoint
    model_folder = os.path.abspath(model_folder)
    source = os.path.join(model_folder, f"fold_{fold}", checkpoint_name)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"no {checkpoint_name} in {os.path.dirname(source)}")
    for name in ("plans.json", "dataset.json"):
        if not os.path.isfile(os.path.join(model_folder, name)):
            raise FileNotFoundError(f"{model_folder} has no {name}: not an nnU-Net model folder")
    if os.path.exists(out_zip) and not overwrite:
        raise FileExistsError(f"{out_zip} exists; remove it or pass --overwrite")
    checkpoint = read_checkpoint(source)
    if checkpoint.get("diffusion") is None:
        raise ValueError(f"{source} was not written by a DiffusionTrainer (trainer "
                         f"{checkpoint.get('trainer_name')!r})")
    slim = released_checkpoint(checkpoint, half)
    dataset = os.path.basename(os.path.dirname(model_folder))
    trainer, sep, rest = os.path.basename(model_folder).partition("__")
    if not sep:
        raise ValueError(f"{model_folder}: expected a folder named TRAINER__PLANS__CONFIGURATION")
    out_trainer, out_fold = as_trainer or trainer, as_fold or fold
    slim["trainer_name"] = out_trainer if as_trainer else slim["trainer_name"]
    prefix = f"{dataset}/{out_trainer}__{rest}"
    info = {"trainer": slim["trainer_name"], "fold": out_fold, "trained_as": {"trainer": checkpoint["trainer_name"],
                                                                                 "fold": fold},
            "checkpoint": checkpoint_name,
            "weights_sha256": bytes(slim["network_weights"][DIGEST_KEY].tolist()).hex(),
            "storage": "float16" if half else "as trained", "epochs": checkpoint.get("current_epoch"),
            "diffusion": checkpoint["diffusion"], **(notes or {})}
    tmp = f"{out_zip}.tmp{os.getpid()}"
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
            for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
                path = os.path.join(model_folder, name)
                if os.path.isfile(path):
                    z.write(path, f"{prefix}/{name}")
            with z.open(f"{prefix}/fold_{out_fold}/checkpoint_final.pth", "w") as f:
                torch.save(slim, f)
            z.writestr(f"{prefix}/release.json", json.dumps(info, indent=1))
        os.replace(tmp, out_zip)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    digest = file_sha256(out_zip)
    with open(out_zip + ".sha256", "w") as f:
        f.write(f"{digest}  {os.path.basename(out_zip)}\n")
    info["zip_sha256"], info["zip_bytes"] = digest, os.path.getsize(out_zip)
    return info


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_zip(path: str, expected: Optional[str] = None) -> str:
    """The zip's SHA-256, checked against ``expected`` or the ``.sha256`` file beside it."""
    if expected is None:
        side = path + ".sha256"
        if not os.path.isfile(side):
            raise FileNotFoundError(f"no {os.path.basename(side)} beside {path} and no checksum given")
        expected = open(side).read().split()[0]
    found = file_sha256(path)
    if found != expected:
        raise ChecksumError(f"{path}: SHA-256 {found}, expected {expected}: the file is corrupted or not the "
                            "released one")
    return found
