"""Crash safety and refusal of mismatched checkpoints, on real nnU-Net training runs."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import BIN, DATASET, TR, _fold, _train, run

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


def test_sigkill_right_after_a_checkpoint_save_then_resume(env):
    fold = _fold(env, KILL_TR)
    shutil.rmtree(os.path.dirname(fold), ignore_errors=True)
    latest = os.path.join(fold, "checkpoint_latest.pth")
    proc = subprocess.Popen([f"{BIN}/nnUNetv2_train", "990", "3d_fullres", "0", "-tr", KILL_TR, "-device", "cpu"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: os.path.isfile(latest), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _loads(latest) >= 1
    _resume_and_finish(env, fold)


SLOW_SAVE = r"""
import os, sys, time, torch
marker = sys.argv[1]
orig = torch.save
count = [0]
def slow_save(obj, f, *a, **k):
    orig(obj, f, *a, **k)
    name = getattr(f, "name", str(f))
    if "checkpoint_latest" in name:
        count[0] += 1
        if count[0] == 2:   # the second save of checkpoint_latest: written, flushed, not yet renamed
            open(marker, "w").close()
            time.sleep(600)
torch.save = slow_save
from nnunetv2.run.run_training import run_training
run_training("990", "3d_fullres", 0, sys.argv[2], device=torch.device("cpu"))
"""


def test_sigkill_during_a_checkpoint_save_then_resume(env, tmp_path):
    fold = _fold(env, KILL_TR)
    shutil.rmtree(os.path.dirname(fold), ignore_errors=True)
    marker = tmp_path / "saving"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(marker), KILL_TR], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(marker.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = os.path.join(fold, "checkpoint_latest.pth")
    assert [f for f in os.listdir(fold) if f.startswith("checkpoint_latest.pth.tmp")]  # the torn write
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
    assert "trained with other diffusion settings (recycle: checkpoint True vs trainer False)" in proc.stderr
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
