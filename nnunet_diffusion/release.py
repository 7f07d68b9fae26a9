"""Released models: a trained model folder as a compact zip that nnU-Net's own installer accepts, with a checksum
of the weights that is verified whenever they are loaded.

``nnunet-diffusion release -d 4 -c 3d_fullres -f all -tr DiffusionTrainer -o model.zip [--half]`` writes

    Dataset004_Hippocampus/DiffusionTrainer__nnUNetPlans__3d_fullres/
        plans.json  dataset.json  dataset_fingerprint.json  release.json
        fold_all/checkpoint_final.pth     (weights only: no optimizer state, no raw pre-average weights)

(the layout of ``nnUNetv2_export_model_to_zip``, so ``nnUNetv2_install_pretrained_model_from_zip model.zip``
installs it into ``nnUNet_results``) and ``model.zip.sha256`` (``sha256sum -c`` format) for the file itself.

The checkpoint's ``network_weights`` carry the weights' digest (``checkpoint.DIGEST_KEY``), checked by every
command that loads them (``checkpoint.verify_and_strip``), so a corrupted copy is refused with an error that says so.
``--half`` stores floating-point weights as float16 (half the size; they are cast back to float32 on loading,
which changes predictions slightly: compare before shipping).
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from typing import Dict, Optional

import torch

from nnunet_diffusion.checkpoint import DIGEST_KEY, ChecksumError, read_checkpoint, released_checkpoint


def release_model(model_folder: str, fold: str, out_zip: str, checkpoint_name: str = "checkpoint_final.pth",
                  half: bool = False, notes: Optional[Dict] = None, overwrite: bool = False,
                  as_fold: Optional[str] = None, as_trainer: Optional[str] = None) -> Dict:
    """Write the release zip of ``model_folder/fold_{fold}`` (see the module docstring) and its ``.sha256``.
    ``as_fold`` / ``as_trainer``: the fold and trainer name the installed model has (e.g. a model trained as
    ``DiffusionTrainer_30ep100it`` on a custom split, released as ``DiffusionTrainer`` fold ``all``: a budget
    suffix changes the training length only, and the trainer's diffusion settings are still checked on loading).
    Returns release.json's content."""
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
