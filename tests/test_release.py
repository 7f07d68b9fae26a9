"""Released models (`nnunet-diffusion release`): weights only, installable with nnU-Net's own command, and a
corrupted copy refused by every command that loads it."""
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import BIN, DATASET, TR, run, tiny_diffusion_net
from nnunet_diffusion.checkpoint import (DIGEST_KEY, ChecksumError, released_checkpoint, verify_and_strip,
                                         weights_digest)
from nnunet_diffusion.release import check_zip


def test_digest_covers_every_byte_name_and_dtype():
    net = tiny_diffusion_net()
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    d = weights_digest(sd)
    assert d == weights_digest({k: v.clone() for k, v in reversed(list(sd.items()))})  # order of the dict: no
    name = next(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 10)
    flipped = {k: v.clone() for k, v in sd.items()}
    flipped[name].view(-1).view(torch.uint8)[5] ^= 1  # one bit of one weight
    assert weights_digest(flipped) != d
    renamed = dict(sd)
    renamed[name + "_x"] = renamed.pop(name)
    assert weights_digest(renamed) != d
    assert weights_digest({**sd, name: sd[name].double()}) != d


def test_network_refuses_corrupted_released_weights_and_loads_intact_ones():
    net = tiny_diffusion_net()
    released = released_checkpoint({"network_weights": net.state_dict(), "init_args": {}, "trainer_name": TR,
                                     "inference_allowed_mirroring_axes": (0, 1, 2), "optimizer_state": {"x": 1}})
    assert "optimizer_state" not in released
    weights = released["network_weights"]
    other = tiny_diffusion_net()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.load_state_dict(weights)  # the digest entry is removed before nn.Module's strict load
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), net.state_dict().values()))
    name = next(k for k, v in weights.items() if k != DIGEST_KEY and v.is_floating_point())
    bad = {k: v.clone() for k, v in weights.items()}
    bad[name].view(-1)[0] += 1e-3
    with pytest.raises(ChecksumError, match="corrupted"):
        tiny_diffusion_net().load_state_dict(bad)
    plain = {k: v for k, v in weights.items() if k != DIGEST_KEY}
    assert verify_and_strip(plain) is plain  # weights that were never released load as before


def test_half_storage_halves_the_weights_and_loads_as_float32():
    net = tiny_diffusion_net()
    ck = {"network_weights": net.state_dict(), "init_args": {}, "trainer_name": TR,
          "inference_allowed_mirroring_axes": (0, 1, 2)}
    half = released_checkpoint(ck, half=True)["network_weights"]
    assert all(v.dtype == torch.float16 for k, v in half.items() if k != DIGEST_KEY and v.is_floating_point())
    other = tiny_diffusion_net()
    other.load_state_dict(half)
    p = next(other.parameters())
    assert p.dtype == torch.float32
    assert torch.allclose(p, next(net.parameters()), atol=1e-3)


def test_released_model_installs_with_nnunet_and_predicts_the_same(env, inproc, trained_3d, tmp_path):
    zip_path = tmp_path / "model.zip"
    # released under the name users predict with: DiffusionTrainer, fold all (trained as the budget trainer, fold 0)
    proc = run([f"{BIN}/nnunet-diffusion", "release", "-d", "990", "-f", "0", "-tr", TR, "-o", str(zip_path),
                "--as-fold", "all", "--as-trainer", "DiffusionTrainer"], env=env)
    assert "nnUNetv2_install_pretrained_model_from_zip" in proc.stdout
    assert check_zip(str(zip_path))  # the .sha256 written beside it
    assert os.path.getsize(zip_path) < os.path.getsize(os.path.join(trained_3d, "checkpoint_final.pth"))
    # an existing zip is not overwritten
    from nnunet_diffusion.release import release_model
    before = zip_path.read_bytes()
    with pytest.raises(FileExistsError, match="exists"):
        release_model(os.path.dirname(trained_3d), "0", str(zip_path))
    assert zip_path.read_bytes() == before

    installed = dict(env, nnUNet_results=str(tmp_path / "results"))
    run([f"{BIN}/nnUNetv2_install_pretrained_model_from_zip", str(zip_path)], env=installed)
    folder = tmp_path / "results" / DATASET / "DiffusionTrainer__nnUNetPlans__3d_fullres"
    ck_path = folder / "fold_all" / "checkpoint_final.pth"
    ck = torch.load(ck_path, map_location="cpu", weights_only=False)
    assert ck["trainer_name"] == "DiffusionTrainer"
    assert "optimizer_state" not in ck and "training_network_weights" not in ck and DIGEST_KEY in ck["network_weights"]

    # the installed model predicts what the original predicts (nnU-Net's own predictor, in this process)
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    image = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(env["raw"], "imagesTr", "case_003_0000.nii.gz")))
    props = {"spacing": [1.0, 1.0, 1.0]}
    segs = []
    for model, fold in ((os.path.dirname(trained_3d), 0), (str(folder), "all")):
        p = nnUNetPredictor(use_mirroring=False, perform_everything_on_device=False, device=torch.device("cpu"),
                            allow_tqdm=False)
        p.initialize_from_trained_model_folder(model, (fold,), "checkpoint_final.pth")
        segs.append(p.predict_single_npy_array(image[None].astype(np.float32), props))
    assert np.array_equal(segs[0], segs[1])

    # a corrupted copy: one weight changed in the installed checkpoint
    w = ck["network_weights"]
    name = next(k for k, v in w.items() if k != DIGEST_KEY and v.is_floating_point())
    w[name].view(-1)[0] += 1e-2
    torch.save(ck, ck_path)
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(os.path.join(env["raw"], "imagesTr", "case_003_0000.nii.gz"), inp)
    out = tmp_path / "bad"
    proc = run([f"{BIN}/nnUNetv2_predict", "-i", str(inp), "-o", str(out), "-d", "990", "-c", "3d_fullres", "-f",
                "all", "-tr", "DiffusionTrainer", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"],
               env=installed, check=False)
    assert proc.returncode != 0
    assert "SHA-256" in proc.stderr and "corrupted" in proc.stderr, proc.stderr[-2000:]
    assert not (out / "case_003.nii.gz").exists()


def test_release_of_a_missing_model_fails_clearly_and_writes_nothing(trained_3d, tmp_path):
    from nnunet_diffusion.release import release_model
    with pytest.raises(FileNotFoundError, match="no checkpoint_final.pth"):
        release_model(os.path.dirname(trained_3d), "all", str(tmp_path / "m.zip"))
    assert not (tmp_path / "m.zip").exists()


@pytest.mark.parametrize("half", [False, True])
def test_weights_shared_by_two_names_are_stored_once(half, tmp_path):
    """nnU-Net's U-Net holds its encoder under two names, and a weight average keeps two equal copies of it; a
    release must not write those weights twice."""
    net = tiny_diffusion_net()
    sd = {k: v.clone() for k, v in net.state_dict().items()}  # equal copies, separate storages (as in the EMA)
    assert any(k.startswith("unet.decoder.encoder.") for k in sd)
    ck = {"network_weights": sd, "init_args": {}, "trainer_name": TR, "inference_allowed_mirroring_axes": (0,)}
    w = released_checkpoint(ck, half=half)["network_weights"]
    storages = {v.untyped_storage().data_ptr() for k, v in w.items() if k != DIGEST_KEY}
    # at most one storage per tensor of the network (equal contents, e.g. zero biases, may share further)
    assert len(storages) <= len({v.untyped_storage().data_ptr() for v in net.state_dict().values()}) < len(sd)
    a = "unet.encoder.stages.0.0.convs.0.conv.weight"
    assert w[a].untyped_storage().data_ptr() == w["unet.decoder." + a[5:]].untyped_storage().data_ptr()


def test_release_split_holds_out_exactly_the_demo_cases(tmp_path):
    import json
    from train_release import DEMO_HELD_OUT, add_release_split
    cases = [f"hippocampus_{i:03d}" for i in range(1, 80)]
    stock = [{"train": cases[i::5], "val": cases[i + 1::5]} for i in range(5)]
    path = tmp_path / "splits_final.json"
    path.write_text(json.dumps(stock))
    add_release_split(str(path), cases)
    splits = json.load(open(path))
    assert splits[:5] == stock  # nnU-Net's folds untouched
    assert splits[5]["val"] == DEMO_HELD_OUT == [f"hippocampus_{i:03d}" for i in range(48, 54)]
    assert sorted(splits[5]["train"] + splits[5]["val"]) == cases and not set(splits[5]["train"]) & set(DEMO_HELD_OUT)
    add_release_split(str(path), cases)  # again: nothing changes
    assert json.load(open(path)) == splits
    splits[5]["val"] = splits[5]["val"][:3]
    path.write_text(json.dumps(splits))
    with pytest.raises(ValueError, match="not the release split"):
        add_release_split(str(path), cases)
    with pytest.raises(ValueError, match="lacks the demo"):
        add_release_split(str(tmp_path / "x.json"), cases[:40])
