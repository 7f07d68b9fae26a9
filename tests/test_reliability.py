"""Crash safety and refusal of mismatched checkpoints, on real nnU-Net training runs."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import BIN, DATASET, _fold, _train, run

KILL_TR = "DiffusionTrainer_6ep2it"  # saves checkpoint_latest after every epoch


def _wait_for(predicate, proc, timeout=300):
    start = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training ended before the event (rc {proc.returncode}):\n"
                                 f"{proc.stdout.read()[-3000:] if proc.stdout else ''}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def _loads(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt["current_epoch"]


def _resume_and_finish(env, fold):
    proc = _train(env, KILL_TR, extra=("--c",))
    assert "Mean Validation Dice" in proc.stdout
    assert _loads(os.path.join(fold, "checkpoint_final.pth")) == 6
    assert not [f for f in os.listdir(fold) if ".tmp" in f]


TORN_SAVE = r"""
import io, os, sys, time, torch
marker = sys.argv[1]
orig = torch.save
count = [0]
def torn_save(obj, f, *a, **k):
    name = getattr(f, "name", str(f))
    if "checkpoint_latest" in name:
        count[0] += 1
        if count[0] == 2:   # the second save of checkpoint_latest: half of its bytes reach the disk, then SIGKILL
            buf = io.BytesIO()
            orig(obj, buf, *a, **k)
            data = buf.getvalue()
            fh = f if hasattr(f, "write") else open(f, "wb")
            fh.write(data[: len(data) // 2])
            fh.flush()
            os.fsync(fh.fileno())
            open(marker, "w").close()
            time.sleep(600)
    return orig(obj, f, *a, **k)
torch.save = torn_save
from nnunetv2.run.run_training import run_training
run_training("990", "3d_fullres", 0, sys.argv[2], device=torch.device("cpu"))
"""


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_checkpoint(env, tmp_path):
    """A real partial write: the process dies with half of the new checkpoint written. checkpoint_latest.pth
    must still be the previous, complete one (a plain torch.save to it would leave it torn)."""
    fold = _fold(env, KILL_TR)
    shutil.rmtree(os.path.dirname(fold), ignore_errors=True)
    marker = tmp_path / "saving"
    proc = subprocess.Popen([sys.executable, "-c", TORN_SAVE, str(marker), KILL_TR], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(marker.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = os.path.join(fold, "checkpoint_latest.pth")
    torn = [f for f in os.listdir(fold) if f.startswith("checkpoint_latest.pth.tmp")]
    assert torn  # the half-written file is the temporary one
    with pytest.raises(Exception):
        torch.load(os.path.join(fold, torn[0]), map_location="cpu", weights_only=False)
    assert _loads(latest) == 1  # the previous, complete save
    _resume_and_finish(env, fold)


def test_checkpoint_with_other_diffusion_settings_is_refused(env, trained_3d):
    other = "DiffusionTrainer_noRecycle_2ep3it"
    dst = _fold(env, other)
    shutil.rmtree(os.path.dirname(dst), ignore_errors=True)
    os.makedirs(dst)
    for f in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        shutil.copy(os.path.join(os.path.dirname(trained_3d), f), os.path.dirname(dst))
    ckpt = torch.load(os.path.join(trained_3d, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    ckpt["current_epoch"] = 1
    torch.save(ckpt, os.path.join(dst, "checkpoint_latest.pth"))
    before = open(os.path.join(dst, "checkpoint_latest.pth"), "rb").read()
    proc = run([f"{BIN}/nnUNetv2_train", "990", "3d_fullres", "0", "-tr", other, "-device", "cpu", "--c"],
               env=env, check=False)
    assert proc.returncode != 0
    assert "trained with other diffusion settings (recycle: checkpoint True vs trainer False, " in proc.stderr
    assert open(os.path.join(dst, "checkpoint_latest.pth"), "rb").read() == before
    assert not os.path.isfile(os.path.join(dst, "checkpoint_final.pth"))


def test_truncated_checkpoint_is_refused(env, trained_3d, tmp_path):
    dst = _fold(env, "DiffusionTrainer_3ep3it")
    shutil.rmtree(os.path.dirname(dst), ignore_errors=True)
    os.makedirs(dst)
    data = open(os.path.join(trained_3d, "checkpoint_final.pth"), "rb").read()
    with open(os.path.join(dst, "checkpoint_latest.pth"), "wb") as f:
        f.write(data[: len(data) // 2])
    proc = run([f"{BIN}/nnUNetv2_train", "990", "3d_fullres", "0", "-tr", "DiffusionTrainer_3ep3it", "-device",
                "cpu", "--c"], env=env, check=False)
    assert proc.returncode != 0
    assert "is corrupt or truncated" in proc.stderr


def test_non_finite_loss_skips_the_update(make_trainer):
    tr = make_trainer("DiffusionTrainer_1ep1it")
    batch = next(tr.dataloader_train)
    batch["data"] = batch["data"].clone()
    batch["data"][0, 0, 0, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in tr.network.state_dict().items()}
    out = tr.train_step(batch)
    assert not np.isfinite(out["loss"])
    after = tr.network.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert tr.skipped_updates == 1
    assert "update skipped" in open(tr.log_file).read()
    # a finite batch afterwards trains normally
    batch = next(tr.dataloader_train)
    assert np.isfinite(tr.train_step(batch)["loss"])
    assert any(not torch.equal(before[k], v) for k, v in tr.network.state_dict().items())


def test_checkpoint_keeps_every_key_of_the_stock_checkpoint(make_trainer, tmp_path):
    """DiffusionTrainer.save_checkpoint writes its own dictionary (to add the settings and write atomically);
    a key that nnU-Net's save_checkpoint writes and ours drops (e.g. after an nnU-Net upgrade) fails here."""
    for name in ("nnUNetTrainer_1ep1it", "DiffusionTrainer_1ep1it"):
        make_trainer(name).save_checkpoint(str(tmp_path / f"{name}.pth"))
    stock = torch.load(tmp_path / "nnUNetTrainer_1ep1it.pth", map_location="cpu", weights_only=False)
    ours = torch.load(tmp_path / "DiffusionTrainer_1ep1it.pth", map_location="cpu", weights_only=False)
    # ours adds the diffusion settings
    assert set(ours) - set(stock) == {"diffusion"}
    assert set(stock) <= set(ours), f"keys nnU-Net writes and DiffusionTrainer drops: {set(stock) - set(ours)}"
    assert ours["trainer_name"] == "DiffusionTrainer_1ep1it" and ours["current_epoch"] == stock["current_epoch"]


@pytest.mark.parametrize("kind", ["ignore", "regions"])
def test_ignore_label_and_regions_are_refused(env, kind):
    import json
    src = os.path.join(env["nnUNet_preprocessed"], DATASET)
    name = "Dataset991_SynthIgnore" if kind == "ignore" else "Dataset992_SynthRegions"
    dst = os.path.join(env["nnUNet_preprocessed"], name)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    plans = json.load(open(os.path.join(dst, "nnUNetPlans.json")))
    plans["dataset_name"] = name
    json.dump(plans, open(os.path.join(dst, "nnUNetPlans.json"), "w"))
    ds = json.load(open(os.path.join(dst, "dataset.json")))
    if kind == "ignore":
        ds["labels"]["ignore"] = 3
        expected = "does not support an ignore label (label 3)"
    else:
        ds["labels"] = {"background": 0, "whole": [1, 2], "two": 2}
        ds["regions_class_order"] = [1, 2]
        expected = "does not support region-based labels"
    json.dump(ds, open(os.path.join(dst, "dataset.json"), "w"))
    proc = run([f"{BIN}/nnUNetv2_train", name, "3d_fullres", "0", "-tr", "DiffusionTrainer_1ep1it", "-device",
                "cpu"], env=env, check=False)
    assert proc.returncode == 1
    assert expected in proc.stderr


def test_ext_trainer_pointing_elsewhere_fails_clearly(env, tmp_path):
    proc = run([f"{BIN}/nnUNetv2_train", "990", "3d_fullres", "0", "-tr", "DiffusionTrainer", "-device", "cpu"],
               env=dict(env, nnUNet_extTrainer=str(tmp_path)), check=False)
    assert proc.returncode == 1
    assert "Could not find requested nnunet trainer DiffusionTrainer" in proc.stderr
    assert f"nnUNet_extTrainer={tmp_path}" in proc.stderr
