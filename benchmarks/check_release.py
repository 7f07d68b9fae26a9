"""Check the released example model the way a user meets it, and write what was measured.

    python benchmarks/check_release.py        # ~3 min on 2 CPU cores

1. the zip's SHA-256 against ``<zip>.sha256``;
2. ``nnUNetv2_install_pretrained_model_from_zip`` into a fresh ``nnUNet_results`` (a temporary folder);
3. the demo's 6 held-out cases (``data/Dataset504_HippocampusDemo/imagesTs``, not used in training) predicted with
   stock ``nnUNetv2_predict -d 4 -c 3d_fullres -f all -tr DiffusionTrainer`` (nnU-Net's default mirroring) and
   with ``nnUNetv2_predict_diffusion --num-samples 4 --uncertainty`` (its default TTA), Dice per case and time;
4. corrupted copies are refused: one weight changed in the installed checkpoint (``nnUNetv2_predict`` must fail
   naming the SHA-256 and write no segmentation), one byte changed in a copy of the zip (``check_zip``).

Writes ``-o``/check.json and check.md (default ``results/Dataset004_Hippocampus/release_check``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from study_lib import REPO_ROOT, tool_path

ZIP = os.path.join(REPO_ROOT, "models", "Dataset004_Hippocampus_DiffusionTrainer.zip")
DATA = os.path.join(REPO_ROOT, "data", "Dataset504_HippocampusDemo")


def _run(cmd, env, check=True) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, env=env, check=check, capture_output=not check, text=True)


def _dice(folder: str, labels_dir: str) -> dict:
    import SimpleITK as sitk

    from nnunet_diffusion.demo import dice_per_class
    out = {}
    for f in sorted(os.listdir(labels_dir)):
        ref = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(labels_dir, f)))
        pred = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, f)))
        out[f[:-7]] = float(np.mean(dice_per_class(pred, ref, [1, 2])))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zip", default=ZIP)
    ap.add_argument("--data", default=DATA, help="folder with imagesTs/ and labelsTs/ (default: the demo's)")
    ap.add_argument("-o", default=os.path.join(REPO_ROOT, "results", "Dataset004_Hippocampus", "release_check"))
    ap.add_argument("-device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args(argv)
    if not os.path.isfile(args.zip):
        ap.error(f"no released model at {args.zip} (benchmarks/train_release.py makes it)")

    import torch

    from nnunet_diffusion.cli import trainers_path
    from nnunet_diffusion.machine import describe, machine_info
    from nnunet_diffusion.release import ChecksumError, DIGEST_KEY, check_zip

    report = {"zip": os.path.relpath(args.zip, REPO_ROOT), "zip_sha256": check_zip(args.zip),
              "zip_bytes": os.path.getsize(args.zip)}
    tmp = tempfile.mkdtemp(prefix="release_check_")
    try:
        env = dict(os.environ, nnUNet_results=os.path.join(tmp, "results"), nnUNet_raw=os.path.join(tmp, "raw"),
                   nnUNet_preprocessed=os.path.join(tmp, "pre"), nnUNet_extTrainer=trainers_path())
        _run([tool_path("nnUNetv2_install_pretrained_model_from_zip"), args.zip], env)
        images, labels = os.path.join(args.data, "imagesTs"), os.path.join(args.data, "labelsTs")
        common = ["-i", images, "-d", "4", "-c", "3d_fullres", "-f", "all", "-tr", "DiffusionTrainer",
                  "-device", args.device, "-npp", "1", "-nps", "1"]
        runs = {"nnUNetv2_predict (default mirroring)": [tool_path("nnUNetv2_predict")],
                "nnUNetv2_predict_diffusion --num-samples 4 --uncertainty (default --tta chain)":
                    [tool_path("nnUNetv2_predict_diffusion"), "--num-samples", "4", "--uncertainty"]}
        report["predictions"] = {}
        for k, (name, cmd) in enumerate(runs.items()):
            out = os.path.join(tmp, f"pred{k}")
            t0 = time.time()
            _run([*cmd, *common, "-o", out], env)
            dice = _dice(out, labels)
            report["predictions"][name] = {"seconds": round(time.time() - t0, 1), "dice_per_case": dice,
                                           "mean_dice": float(np.mean(list(dice.values())))}
            print(f"{name}: mean foreground Dice {report['predictions'][name]['mean_dice']:.4f}", flush=True)

        # a corrupted installed checkpoint: one weight changed
        ck_path = os.path.join(env["nnUNet_results"], "Dataset004_Hippocampus",
                               "DiffusionTrainer__nnUNetPlans__3d_fullres", "fold_all", "checkpoint_final.pth")
        ck = torch.load(ck_path, map_location="cpu", weights_only=False)
        w = ck["network_weights"]
        name = next(n for n, v in w.items() if n != DIGEST_KEY and v.is_floating_point())
        w[name].view(-1)[0] += 1e-2
        torch.save(ck, ck_path)
        bad = os.path.join(tmp, "bad")
        proc = _run([tool_path("nnUNetv2_predict"), *common, "-o", bad, "--disable_tta"], env, check=False)
        written = sorted(f for f in os.listdir(bad) if f.endswith(".nii.gz")) if os.path.isdir(bad) else []
        lines = [ln for ln in proc.stderr.splitlines() if "SHA-256" in ln]
        report["corrupted_checkpoint"] = {"exit_code": proc.returncode, "error": lines[-1] if lines else None,
                                          "segmentations_written": written,
                                          "refused": proc.returncode != 0 and bool(lines) and not written}
        # a corrupted zip: one byte changed in a copy (its .sha256 beside it)
        bad_zip = os.path.join(tmp, os.path.basename(args.zip))
        shutil.copy(args.zip, bad_zip)
        shutil.copy(args.zip + ".sha256", bad_zip + ".sha256")
        with open(bad_zip, "r+b") as f:
            f.seek(os.path.getsize(bad_zip) // 2)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0xFF]))
        try:
            check_zip(bad_zip)
            report["corrupted_zip"] = {"refused": False, "error": None}
        except ChecksumError as e:
            report["corrupted_zip"] = {"refused": True, "error": str(e).replace(tmp, "<tmp>")}
        if report["corrupted_checkpoint"]["error"]:
            report["corrupted_checkpoint"]["error"] = report["corrupted_checkpoint"]["error"].replace(tmp, "<tmp>")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    labels_list = sorted(os.listdir(os.path.join(args.data, "labelsTs")))
    machine = machine_info(args.device)
    report["machine"] = describe(args.device, machine)
    report["command"] = "python benchmarks/check_release.py " + " ".join(argv if argv is not None else sys.argv[1:])
    os.makedirs(args.o, exist_ok=True)
    with open(os.path.join(args.o, "check.json"), "w") as f:
        json.dump(report, f, indent=1)
    md = [f"# Release check: {report['zip']}", "", f"`{report['command'].strip()}`; {report['machine']}", "",
          f"SHA-256 `{report['zip_sha256']}` ({report['zip_bytes'] / 2**20:.1f} MiB), checked against the "
          "`.sha256` file, then installed with `nnUNetv2_install_pretrained_model_from_zip` into an empty "
          "`nnUNet_results`.", "",
          f"Mean foreground Dice on the {len(labels_list)} held-out cases of `{os.path.relpath(args.data, REPO_ROOT)}` "
          "(not in the training data):", "",
          "| command | mean Dice | per case | time |", "|---|---|---|---|"]
    for name, r in report["predictions"].items():
        per = ", ".join(f"{c[-3:]} {d:.3f}" for c, d in r["dice_per_case"].items())
        md.append(f"| `{name}` | {r['mean_dice']:.4f} | {per} | {r['seconds']:.0f} s |")
    cc, cz = report["corrupted_checkpoint"], report["corrupted_zip"]
    md += ["", f"* one weight changed in the installed checkpoint: `nnUNetv2_predict` exit code {cc['exit_code']}, "
               f"segmentations written: {len(cc['segmentations_written'])}; error: `{cc['error']}`",
           f"* one byte changed in a copy of the zip: {'refused' if cz['refused'] else 'NOT refused'}: `{cz['error']}`"]
    with open(os.path.join(args.o, "check.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    ok = cc["refused"] and cz["refused"]
    if not ok:
        print("error: a corrupted copy was not refused", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
