"""The accuracy study's protocol (issue: close the Dice gap to stock nnU-Net at equal budget).

    python benchmarks/accuracy_protocol.py -o results/Dataset004_Hippocampus/accuracy_cpu_12x50 \
        [--budget 12x50] [--batch-size 2] [--fold 0] [-device cpu] [--trainers nnUNetTrainer DiffusionTrainer_paper ...]

Needs nnUNet_raw / nnUNet_preprocessed / nnUNet_results, with Dataset004_Hippocampus in nnUNet_raw (e.g. a link
to ../shared/data/Dataset004_Hippocampus). Plans and preprocesses 3d_fullres if needed and sets the planned
batch size to ``--batch-size`` (the same plans for every trainer). For every trainer, in order, one at a time
(two trainings on 2 cores slow each other 2-4x):

1. ``nnUNetv2_train 4 3d_fullres FOLD -tr <Trainer>_<E>ep<I>it`` (skipped when finished, ``--c`` when interrupted).
   Its final validation (nnU-Net's predictor, default mirroring) gives the *mirrored* predictions.
2. The fold's validation cases without mirroring: ``nnUNetv2_predict --disable_tta`` for stock,
   ``nnUNetv2_predict_diffusion --tta off --save-steps`` for diffusion models (every step's x0_hat), and
   ``--average-last m`` for m = 2, 3, K (mean probability of the last m steps).
3. Dice per case of every prediction folder; paired comparisons against stock in the same mode (``compare``
   reports), and for diffusion models the per-step table and the relative change of the logits between t = 0
   and t = 1000 conditioning (same image, same x_t).

Writes to ``-o``: ``accuracy.json`` (per-case Dice of every method and mode, the commands, machine, versions,
budget), ``accuracy.md`` (the tables), ``diagnosis.json``, one ``compare`` report folder per pair, and the
training logs. Rerunning skips what is done.

``--repeats N --jobs J`` (a GPU): every trainer trained N times, J trainings side by side, each run in its own
results root; step 1 only (nnU-Net's final validation), and every run recorded, so the tables compare the
per-case mean over a method's runs with stock's (``benchmarks/gpu_accuracy.sh`` runs it on a lent GPU).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List

import numpy as np

from study_lib import (CONFIG, DATASET, DATASET_ID, case_mean, paired, prepare, run_label, sh, summary_dice,
                       tool_path, val_images)

DEFAULT_TRAINERS = ["nnUNetTrainer", "DiffusionTrainer_paper", "DiffusionTrainer"]


def train(trainer: str, fold: int, device: str, out: str) -> Dict:
    from nnunetv2.paths import nnUNet_results
    fold_dir = os.path.join(str(nnUNet_results), DATASET, f"{trainer}__nnUNetPlans__{CONFIG}", f"fold_{fold}")
    cmd = [tool_path("nnUNetv2_train"), DATASET_ID, CONFIG, str(fold), "-tr", trainer, "-device", device]
    if not os.path.isfile(os.path.join(fold_dir, "validation", "summary.json")):
        if os.path.isfile(os.path.join(fold_dir, "checkpoint_latest.pth")):
            cmd.append("--c")
        env = dict(os.environ)
        env.setdefault("nnUNet_n_proc_DA", "0" if device == "cpu" else "8")
        env.setdefault("nnUNet_compile", "f")
        sh(cmd, os.path.join(out, "logs", f"{trainer}_train.log"), env)
    epoch_times, _ = copy_training_logs(fold_dir, trainer, out)
    return {"command": "nnUNetv2_train " + " ".join(cmd[1:]), "fold_dir": fold_dir,
            "epoch_times_s": epoch_times, "training_s": round(sum(epoch_times), 1)}


def copy_training_logs(fold_dir: str, trainer: str, out: str, run: int = 0):
    """A run's nnU-Net training logs copied to ``out/logs`` as ``TRAINER_training_log_...txt`` (``run`` > 0:
    ``TRAINER_runR_training_log_...txt``, since runs side by side can start in the same second, which is all
    nnU-Net's log name tells apart); returns the seconds of every epoch they record and the copied names (oldest
    first)."""
    logs = sorted(glob.glob(os.path.join(fold_dir, "training_log_*.txt")))
    epoch_times = [float(line.rsplit(":", 1)[1].strip().split()[0]) for lg in logs for line in open(lg)
                   if "Epoch time:" in line]
    names = [f"{trainer}{f'_run{run}' if run else ''}_{os.path.basename(lg)}" for lg in logs]
    for lg, name in zip(logs, names):
        shutil.copy(lg, os.path.join(out, "logs", name))
    return epoch_times, names


def log_date(log_name: str) -> str:
    """'...training_log_2026_11_29_08_53_03.txt' -> '2026-11-29 08:53 UTC'."""
    y, mo, d, h, mi = log_name.rsplit("training_log_", 1)[1].split("_")[:5]
    return f"{y}-{mo}-{d} {h}:{mi} UTC"


def training_start(trainer: str, out: str, before: str = "9999") -> str:
    """When a run of ``trainer`` started, from the newest nnU-Net training log copied to ``out/logs`` whose time
    is earlier than ``before`` (the logs are named training_log_YYYY_MM_DD_HH_MM_SS.txt)."""
    stamps = sorted(x for x in (log_date(os.path.basename(lg)) for lg in
                                glob.glob(os.path.join(out, "logs", f"{trainer}_training_log_*.txt"))) if x < before)
    return stamps[-1] if stamps else "unknown"


def train_repeats(bases: List[str], epochs: int, iters: int, repeats: int, jobs: int, fold: int, device: str,
                  out: str, train: bool = True) -> List[Dict]:
    """Every trainer of ``bases`` trained ``repeats`` times, up to ``jobs`` trainings side by side (a GPU), each run
    in its own results root ``$nnUNet_results/DATASET/accuracy_repeats/runR`` (nnU-Net names a model folder by
    trainer, so two runs of one trainer need two roots); the same plans and split for all. Resumable: a finished run
    (final validation written) is reused, an interrupted one continues with ``--c``. Returns one dict per run, in
    the order of ``bases`` then runs: base, run, trainer, fold_dir, command, training log (copied to ``out/logs``)."""
    from nnunetv2.paths import nnUNet_results

    from nnunet_diffusion.budget import budget_name
    todo, runs = [], []
    for base in bases:
        trainer = budget_name(base, epochs, iters)
        for r in range(1, repeats + 1):
            root = os.path.join(str(nnUNet_results), DATASET, "accuracy_repeats", f"run{r}")
            fold_dir = os.path.join(root, DATASET, f"{trainer}__nnUNetPlans__{CONFIG}", f"fold_{fold}")
            cmd = [tool_path("nnUNetv2_train"), DATASET_ID, CONFIG, str(fold), "-tr", trainer, "-device", device]
            if os.environ.get("ACCURACY_NPZ") == "1":  # the final validation also saves probabilities (triage)
                cmd.append("--npz")
            run = {"base": base, "run": r, "trainer": trainer, "fold_dir": fold_dir, "root": root,
                   "command": f"nnUNet_results=.../accuracy_repeats/run{r} nnUNetv2_train " + " ".join(cmd[1:])}
            runs.append(run)
            if not os.path.isfile(os.path.join(fold_dir, "validation", "summary.json")):
                if os.path.isfile(os.path.join(fold_dir, "checkpoint_latest.pth")):
                    cmd.append("--c")
                todo.append((run, cmd))
    if todo and not train:  # record what finished, train nothing
        print("not finished, not recorded: " + ", ".join(r["fold_dir"] for r, _ in todo), flush=True)
        runs = [r for r in runs if all(r is not t for t, _ in todo)]
        todo = []
        if not runs:
            raise RuntimeError("no finished run to record")
    running, failed = [], []
    while todo or running:
        while todo and len(running) < jobs:
            run, cmd = todo.pop(0)
            env = dict(os.environ, nnUNet_results=run["root"])
            env.setdefault("nnUNet_n_proc_DA", "0" if device == "cpu" else "3")
            env.setdefault("nnUNet_compile", "f")
            log = os.path.join(out, "logs", f"{run['trainer']}_run{run['run']}_train.log")
            print(f"$ {run['command']}  (log {log})", flush=True)
            f = open(log, "a")
            running.append((run, subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env), f, log))
            time.sleep(2)  # distinct start seconds: nnU-Net names its training log by the second it starts
        for item in list(running):
            run, proc, f, log = item
            if proc.poll() is not None:
                f.close()
                running.remove(item)
                print(f"{run['trainer']} run {run['run']}: exit code {proc.returncode}", flush=True)
                if proc.returncode != 0:
                    failed.append(log)
        time.sleep(5)
    if failed:
        raise RuntimeError(f"{len(failed)} training run(s) failed; see {', '.join(failed)}")
    for run in runs:
        run["epoch_times_s"], names = copy_training_logs(run["fold_dir"], run["trainer"], out, run["run"])
        run["training_log"] = names[0] if names else None
    return runs


def predict_unmirrored(trainer: str, fold: int, device: str, images: str, work: str, out: str,
                       diffusion: bool, num_steps: int) -> Dict[str, str]:
    """Prediction folders without mirroring: {mode: folder}."""
    base = ["-d", DATASET_ID, "-c", CONFIG, "-f", str(fold), "-tr", trainer, "-device", device,
            "-npp", "1", "-nps", "1", "-i", images]
    log = os.path.join(out, "logs", f"{trainer}_predict.log")
    folders = {}
    runs = [("off", [tool_path("nnUNetv2_predict"), "--disable_tta"])] if not diffusion else \
        [("off", [tool_path("nnUNetv2_predict_diffusion"), "--tta", "off", "--average-last", "1", "--save-steps"])] + \
        [(f"off_mean{m}", [tool_path("nnUNetv2_predict_diffusion"), "--tta", "off", "--average-last", str(m)])
         for m in sorted({2, 3, num_steps}) if 1 < m <= num_steps]
    for mode, cmd in runs:
        folder = os.path.join(work, trainer, mode)
        if not os.path.isfile(os.path.join(folder, "done")):
            shutil.rmtree(folder, ignore_errors=True)
            sh(cmd + base + ["-o", folder], log)
            open(os.path.join(folder, "done"), "w").close()
        folders[mode] = folder
    return folders


def logits_dependence_on_t(model_dir: str, fold: int, cases: List[str], device: str,
                           checkpoint: str = "checkpoint_final.pth") -> Dict:
    """Relative L2 change of the logits between t = 0 and t = 1000 for the same image patch and x_t (pure noise,
    and the ground truth noised to t = 500), over the first 5 validation cases (centre patch)."""
    import torch
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_diffusion.predictor import DiffusionPredictor
    from nnunet_diffusion.sampling import encode_mask
    p = DiffusionPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                           perform_everything_on_device=False, device=torch.device(device), verbose=False,
                           allow_tqdm=False)
    p.initialize_from_trained_model_folder(model_dir, (fold,), checkpoint)
    net = p.diffusion_network.eval()
    folder = os.path.join(str(nnUNet_preprocessed), DATASET, "nnUNetPlans_3d_fullres")
    ds = infer_dataset_class(folder)(folder, cases[:5])
    patch = tuple(p.configuration_manager.patch_size)
    schedule = net.schedule(5)
    out = {"noise": [], "gt_t500": []}
    g = torch.Generator().manual_seed(0)
    for c in cases[:5]:
        data, seg, *_ = ds.load_case(c)
        data, seg = torch.from_numpy(np.asarray(data)).float(), torch.from_numpy(np.asarray(seg)).long()
        pad = [max(0, ps - s) for ps, s in zip(patch, data.shape[1:])]
        data = torch.nn.functional.pad(data, [v for q in reversed(pad) for v in (q // 2, q - q // 2)])
        seg = torch.nn.functional.pad(seg.clamp_min(0), [v for q in reversed(pad) for v in (q // 2, q - q // 2)])
        start = [(s - ps) // 2 for s, ps in zip(data.shape[1:], patch)]
        sl = tuple(slice(a, a + ps) for a, ps in zip(start, patch))
        image, label = data[(slice(None), *sl)][None], seg[(slice(None), *sl)][None]
        x0 = encode_mask(label, net.num_classes)
        xts = {"noise": torch.randn(x0.shape, generator=g),
               "gt_t500": schedule.q_sample(x0, torch.tensor([3]), torch.randn(x0.shape, generator=g))}
        with torch.no_grad():
            for name, xt in xts.items():
                a = net.denoise(image, xt, torch.tensor([0])).float()
                b = net.denoise(image, xt, torch.tensor([1000])).float()
                out[name].append(float((a - b).norm() / b.norm()))
    return {k: {"mean": float(np.mean(v)), "per_case": v} for k, v in out.items()}


def mirror_dependence(model_dir: str, fold: int, cases: List[str], device: str, diffusion: bool,
                      checkpoint: str = "checkpoint_final.pth") -> Dict:
    """Dice of each of nnU-Net's test-time mirrorings alone and of their mean probability, per validation case.

    No sliding window: each case whole on the preprocessed grid (zero-padded to a multiple of 16 voxels per
    axis, centred), nnU-Net's 8 mirrorings of the 3 axes. Stock: one network evaluation per mirroring. Diffusion:
    one 5-step chain per mirroring (the same noise for all, flipped with the image), outputs: the last step
    (``last``) and the mean probability of all steps (``mean``). Dice = mean over the foreground classes."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_diffusion.demo import dice_per_class
    from nnunet_diffusion.predictor import mirror_combinations
    from nnunet_diffusion.sampling import p_sample_loop
    p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, perform_everything_on_device=False,
                        device=torch.device(device), verbose=False, allow_tqdm=False)
    p.initialize_from_trained_model_folder(model_dir, (fold,), checkpoint)
    net = p.network.eval()
    net = getattr(net, "_orig_mod", net)
    num_classes = p.label_manager.num_segmentation_heads
    folder = os.path.join(str(nnUNet_preprocessed), DATASET, "nnUNetPlans_3d_fullres")
    ds = infer_dataset_class(folder)(folder, cases)
    combos = mirror_combinations([2, 3, 4])
    outputs = ["last", "mean"] if diffusion else ["logits"]
    dice = {o: {str(c): {} for c in combos} | {"mean of 8": {}} for o in outputs}

    def fg_dice(prob, ref):
        return float(np.mean(dice_per_class(prob.argmax(1)[0].numpy(), ref.numpy(), range(1, num_classes))))

    for case in cases:
        data, seg, *_ = ds.load_case(case)
        data, ref = torch.from_numpy(np.asarray(data)).float()[None], torch.from_numpy(np.asarray(seg))[0].long()
        shape = data.shape[2:]
        pad = [-s % 16 for s in shape]
        x = torch.nn.functional.pad(data, [v for q in reversed(pad) for v in (q // 2, q - q // 2)])
        crop = (slice(None), slice(None), *(slice(q // 2, q // 2 + s) for q, s in zip(pad, shape)))
        g = torch.Generator().manual_seed(0)
        noise = [torch.randn((1, num_classes, *x.shape[2:]), generator=g) for _ in range(5)] if diffusion else None
        probs = {o: [] for o in outputs}
        with torch.no_grad():
            for combo in combos:
                if diffusion:
                    steps = []
                    p_sample_loop(net.denoise, x, net.schedule(5), num_classes, prediction=net.config.prediction,
                                  noise=noise, mirrors=[combo], self_condition=net.config.self_condition,
                                  on_step=lambda k, t, x0, out: steps.append(torch.softmax(out.float(), 1)[crop]))
                    got = {"last": steps[-1], "mean": torch.stack(steps).mean(0)}
                else:
                    out = net(torch.flip(x, combo))
                    out = out[0] if isinstance(out, (list, tuple)) else out
                    got = {"logits": torch.softmax(torch.flip(out, combo).float(), 1)[crop]}
                for o in outputs:
                    probs[o].append(got[o])
                    dice[o][str(combo)][case] = fg_dice(got[o], ref)
        for o in outputs:
            dice[o]["mean of 8"][case] = fg_dice(torch.stack(probs[o]).mean(0), ref)
    return {"per_case": dice, "mean": {o: {k: float(np.mean(list(v.values()))) for k, v in d.items()}
                                        for o, d in dice.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", required=True)
    ap.add_argument("--budget", default="12x50")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("-device", default="cpu")
    ap.add_argument("--trainers", nargs="+", default=DEFAULT_TRAINERS)
    ap.add_argument("--skip-training", action="store_true", help="only evaluate trainers that finished")
    ap.add_argument("--mirrors-only", action="store_true",
                    help="for trained models of --trainers, only (re)compute the per-mirroring diagnosis")
    ap.add_argument("--tables-only", action="store_true",
                    help="only rewrite accuracy.md from accuracy.json and diagnosis.json in -o")
    ap.add_argument("--validation-only", action="store_true",
                    help="only nnU-Net's final validation (default mirroring): no unmirrored predictions or "
                         "diagnoses, e.g. for repeated training runs")
    ap.add_argument("--repeats", type=int, default=1,
                    help="train every trainer N times (each run its own results root), up to --jobs side by side, "
                         "then nnU-Net's final validation only, as with --validation-only; for a GPU")
    ap.add_argument("--jobs", type=int, default=1,
                    help="trainings side by side (default 1); above 1 the runs go as with --repeats")
    ap.add_argument("--record-only", action="store_true",
                    help="with --repeats: train nothing, record the runs that finished (e.g. after "
                         "gpu_accuracy.sh's DEADLINE) and list the others")
    ap.add_argument("--machine-from", metavar="ACCURACY_JSON",
                    help="record the machine of this accuracy.json, written where the trainings ran, instead of "
                         "this one's: for runs trained elsewhere and recorded here from their files (implies "
                         "--record-only)")
    ap.add_argument("--mirror-cases", type=int, default=0,
                    help="per-mirroring diagnosis on the first N validation cases (sorted; 0: all)")
    args = ap.parse_args(argv)

    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_results

    from nnunet_diffusion.budget import budget_name, parse_budget
    from nnunet_diffusion.evaluation import compare, evaluate_folders, step_suffixes
    from nnunet_diffusion.machine import machine_info

    epochs, iters = parse_budget(args.budget)
    out = os.path.abspath(args.o)
    if args.tables_only:
        write_tables(json.load(open(os.path.join(out, "accuracy.json"))), out)
        print(open(os.path.join(out, "accuracy.md")).read())
        return 0
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    work = os.path.join(str(nnUNet_results), DATASET, "accuracy_protocol_work")
    plans = prepare(args.batch_size, os.path.join(out, "logs", "prepare.log"))
    shutil.copy(plans, os.path.join(out, "nnUNetPlans.json"))
    cases = val_images(args.fold, work)
    record_split(os.path.join(str(nnUNet_preprocessed), DATASET, "splits_final.json"), out, args.fold)
    gt = os.path.join(str(nnUNet_preprocessed), DATASET, "gt_segmentations")
    result_path = os.path.join(out, "accuracy.json")
    result = json.load(open(result_path)) if os.path.isfile(result_path) else {}
    result.update({"dataset": DATASET, "configuration": CONFIG, "fold": args.fold, "num_cases": len(cases),
                   "budget": {"epochs": epochs, "iterations": iters, "batch_size": args.batch_size},
                   "device": args.device, "machine": machine_info(args.device) if not args.machine_from else
                   json.load(open(args.machine_from))["machine"],
                   "command": "python benchmarks/accuracy_protocol.py " + " ".join(argv or sys.argv[1:])})
    result.setdefault("methods", {})
    diagnosis = {}
    stock = budget_name("nnUNetTrainer", epochs, iters)
    diag_path = os.path.join(out, "diagnosis.json")
    mirror_cases = cases[:args.mirror_cases] if args.mirror_cases > 0 else cases
    if args.mirrors_only:
        old = json.load(open(diag_path)) if os.path.isfile(diag_path) else {}
        for base in args.trainers:
            trainer = budget_name(base, epochs, iters)
            model_dir = os.path.join(str(nnUNet_results), DATASET, f"{trainer}__nnUNetPlans__{CONFIG}")
            print(f"{trainer}: per-mirroring diagnosis on {len(mirror_cases)} cases", flush=True)
            old.setdefault(trainer, {})["mirrors"] = mirror_dependence(model_dir, args.fold, mirror_cases,
                                                                       args.device, base.startswith("Diffusion"))
            with open(diag_path, "w") as f:
                json.dump(old, f, indent=1)
        # the tables' header (command, date) describes the runs in accuracy.json, not this diagnosis
        write_tables(json.load(open(result_path)) if os.path.isfile(result_path) else result, out)
        print(open(os.path.join(out, "accuracy.md")).read())
        return 0
    if args.repeats > 1 or args.jobs > 1:
        runs = train_repeats(args.trainers, epochs, iters, args.repeats, max(1, args.jobs), args.fold, args.device,
                             out, train=not (args.record_only or args.machine_from))
        record_repeats(result, runs, gt, "python benchmarks/accuracy_protocol.py " + " ".join(argv or sys.argv[1:]))
        if args.machine_from:  # the date the runs started, not the other file's
            result["machine"]["date_utc"] = min(log_date(r["training_log"]) for r in runs)[:-len(" UTC")]
        with open(result_path, "w") as f:
            json.dump(result, f, indent=1)
        write_tables(result, out)
        print(open(os.path.join(out, "accuracy.md")).read())
        return 0
    for base in args.trainers:
        trainer = budget_name(base, epochs, iters)
        model_dir = os.path.join(str(nnUNet_results), DATASET, f"{trainer}__nnUNetPlans__{CONFIG}")
        done = os.path.isfile(os.path.join(model_dir, f"fold_{args.fold}", "validation", "summary.json"))
        if args.skip_training and not done:
            print(f"{trainer}: not trained, skipped", flush=True)
            continue
        t0 = time.time()
        info = train(trainer, args.fold, args.device, out)
        diffusion = base.startswith("Diffusion")
        num_steps = 5
        if diffusion:
            from nnunet_diffusion.budget import make_budget_trainer
            num_steps = make_budget_trainer(trainer).diffusion.num_steps
        folders = {"mirror": os.path.join(info["fold_dir"], "validation")}
        if not args.validation_only:
            folders.update(predict_unmirrored(trainer, args.fold, args.device, os.path.join(work, "images"), work,
                                              out, diffusion, num_steps))
        entry = {"trainer": trainer, "training": info, "modes": {},
                 "protocol_command": "python benchmarks/accuracy_protocol.py " + " ".join(argv or sys.argv[1:])}
        for mode, folder in folders.items():
            ev = evaluate_folders(gt, folder)
            entry["modes"][mode] = {c: v["case"]["dice"] for c, v in ev["cases"].items()}
        if diffusion and not args.validation_only:
            steps = {}
            for suffix in step_suffixes(folders["off"]):
                ev = evaluate_folders(gt, folders["off"], suffix=suffix)
                steps[suffix[1:]] = {c: v["case"]["dice"] for c, v in ev["cases"].items()}
            entry["steps"] = steps
            diagnosis[trainer] = logits_dependence_on_t(model_dir, args.fold, cases, args.device)
        if not args.validation_only:
            diagnosis.setdefault(trainer, {})["mirrors"] = mirror_dependence(model_dir, args.fold, mirror_cases,
                                                                             args.device, diffusion)
        entry["seconds"] = round(time.time() - t0, 1)
        entry["date"] = training_start(trainer, out)
        previous = result["methods"].get(base)
        if previous is not None and previous["modes"].get("mirror") != entry["modes"]["mirror"]:
            # another training run of the same trainer (a fresh workspace): keep the earlier one, it measures
            # run-to-run variation
            previous.setdefault("date", training_start(previous["trainer"], out, before=entry["date"]))
            result.setdefault("earlier_runs", {}).setdefault(base, []).append(previous)
        result["methods"][base] = entry
        with open(result_path, "w") as f:
            json.dump(result, f, indent=1)
        if diagnosis:
            old = json.load(open(diag_path)) if os.path.isfile(diag_path) else {}
            for name, d in diagnosis.items():
                old.setdefault(name, {}).update(d)
            with open(diag_path, "w") as f:
                json.dump(old, f, indent=1)
        if base != "nnUNetTrainer" and "nnUNetTrainer" in result["methods"]:
            stock_dir = os.path.join(str(nnUNet_results), DATASET, f"{stock}__nnUNetPlans__{CONFIG}")
            for mode, folder in ((m, folders[m]) for m in ("mirror", "off") if m in folders):
                other = os.path.join(stock_dir, f"fold_{args.fold}", "validation") if mode == "mirror" else \
                    os.path.join(work, stock, "off")
                if not os.path.isdir(other):
                    # accuracy.md's paired tests use the per-case Dice in accuracy.json; the full report (NSD,
                    # HD95, CD) needs stock's prediction files
                    print(f"no stock predictions in {other}: compare report {base} vs stock ({mode}) skipped",
                          flush=True)
                    continue
                compare(folder, other, gt, os.path.join(out, f"{base}_vs_nnUNetTrainer_{mode}"),
                        names=[base, "nnUNetTrainer"])
    write_tables(result, out)
    print(open(os.path.join(out, "accuracy.md")).read())
    return 0


def validation_dice(folder: str, gt: str) -> Dict[str, float]:
    """Mean foreground Dice per case of nnU-Net's final validation in ``folder``: scored from its segmentations,
    or, where only nnU-Net's ``summary.json`` came back (a GPU run's files, without the predictions), read from
    it (nnU-Net's per-label Dice, averaged over the labels: the same number, see tests)."""
    from nnunet_diffusion.evaluation import evaluate_folders
    if glob.glob(os.path.join(folder, "*.nii.gz")):
        ev = evaluate_folders(gt, folder)
        return {c: v["case"]["dice"] for c, v in ev["cases"].items()}
    summary = os.path.join(folder, "summary.json")
    if not os.path.isfile(summary):
        raise FileNotFoundError(f"no segmentations and no summary.json in {folder}")
    return summary_dice(summary)


def record_repeats(result: Dict, runs: List[Dict], gt: str, command: str) -> None:
    """Add the runs of :func:`train_repeats` to ``result``: per trainer, its newest run becomes ``methods[base]``
    and every other run (and a run recorded before) goes to ``earlier_runs[base]``; a run already recorded (same
    training log) is not added twice."""
    earlier = result.setdefault("earlier_runs", {})
    for base in dict.fromkeys(r["base"] for r in runs):
        known = [result["methods"].get(base)] + earlier.get(base, [])
        seen = {e.get("training", {}).get("log") for e in known if e}
        entries = []
        for run in (r for r in runs if r["base"] == base and r["training_log"] not in seen):
            entries.append({"trainer": run["trainer"], "run": run["run"], "protocol_command": command,
                            "training": {"command": run["command"], "fold_dir": run["fold_dir"],
                                         "epoch_times_s": run["epoch_times_s"],
                                         "training_s": round(sum(run["epoch_times_s"]), 1),
                                         "log": run["training_log"]},
                            "modes": {"mirror": validation_dice(os.path.join(run["fold_dir"], "validation"), gt)},
                            "date": log_date(run["training_log"]) if run["training_log"] else "unknown"})
        if not entries:
            continue
        if result["methods"].get(base) is not None:
            earlier.setdefault(base, []).append(result["methods"][base])
        entries.sort(key=lambda e: e["date"])
        earlier.setdefault(base, []).extend(entries[:-1])
        result["methods"][base] = entries[-1]


# the reference configurations candidates are compared with, in accuracy.md
REFERENCES = [
    ("DiffusionTrainer_paper", "the paper's configuration",
     "A candidate became `DiffusionTrainer`'s default only when it was significantly better than the paper's "
     "configuration."),
    ("DiffusionTrainer_zeroInitMaskInput", "the previous default's configuration",
     "`DiffusionTrainer`'s default until 2026-11-29 (then replaced by `DiffusionTrainer_zeroInitChainMeanEma`)."),
    ("DiffusionTrainer_zeroInitChainMeanEma", "the EMA default's configuration",
     "`DiffusionTrainer`'s default from 2026-11-29 to 30 (on 2026-11-30 without its EMA, "
     "`DiffusionTrainer_zeroInitChainMean`); replaced on 2026-12-01 by `DiffusionTrainer_noisePassSum`'s settings, "
     "whose runs met the rule in NOTES.md."),
]


def mode_label(trainer: str, mode: str) -> str:
    """``mode`` as accuracy.md shows it: nnU-Net's mirrored validation says which output the trainer returns."""
    if mode != "mirror" or not trainer.startswith("Diffusion"):
        return mode
    from nnunet_diffusion.budget import make_budget_trainer
    try:
        cfg = make_budget_trainer(trainer).diffusion
    except AttributeError:  # a study trainer that has left the package: its output setting is not known here
        return mode
    return f"mirror, mean of {cfg.average_last}" if cfg.average_last > 1 else mode


def record_split(splits_file: str, out: str, fold: int) -> None:
    """Keep nnU-Net's split in ``out``. Where ``out`` already holds one (earlier runs were recorded there and are
    compared case by case with this one), the fold must be the same, and the recorded file stays as it is (the
    workspace's may have gained other splits since)."""
    recorded = os.path.join(out, "splits_final.json")
    if not os.path.isfile(recorded):
        shutil.copy(splits_file, recorded)
        return
    new, old = json.load(open(splits_file)), json.load(open(recorded))
    same = fold < min(len(new), len(old)) and all(sorted(new[fold][part]) == sorted(old[fold][part])
                                                   for part in ("train", "val"))
    if not same:
        raise SystemExit(f"fold {fold} of {splits_file} is not the fold recorded in {recorded}: the runs recorded "
                         "there were trained on another split. Use another -o, or nnU-Net's split of those runs.")


def run_mean(result: Dict, name: str) -> Dict[str, Dict[str, float]]:
    """{mode: {case: mean Dice over every training run of ``name``}} (the run in ``methods`` and its
    ``earlier_runs``), over the cases and modes all those runs have. One run: its own Dice."""
    latest = result["methods"].get(name)
    runs = ([latest] if latest else []) + result.get("earlier_runs", {}).get(name, [])
    means = {}
    for mode in (latest or {}).get("modes", {}):
        per_run = [r["modes"][mode] for r in runs if mode in r["modes"]]
        if len(per_run) == len(runs):
            means[mode] = case_mean(per_run)
    return means


def runs_sentence(result: Dict) -> str:
    """How many training runs the tables cover, per method."""
    more = [f"{name} {1 + len(r)}" for name, r in result.get("earlier_runs", {}).items() if r]
    return "One training run per method" + (f", except (runs): {', '.join(more)}." if more else ".")


ESCAPE_DICE = 0.6


def pseudo_dice_curve(log_path: str) -> Dict[str, list]:
    """Per epoch of an nnU-Net training log: the pseudo Dice of every foreground class (nnU-Net's online
    estimate on validation patches) and the mean training loss."""
    import re
    dice, loss = [], []
    for line in open(log_path):
        if "Pseudo dice" in line:
            dice.append([float(v) for v in re.findall(r"(?:np\.float32\()?([-0-9.e]+)\)?[,\]]",
                                                      line.split("Pseudo dice", 1)[1])])
        elif "train_loss" in line:
            loss.append(float(line.split("train_loss", 1)[1].split()[0]))
    return {"pseudo_dice": dice, "train_loss": loss}


def escape_epoch(pseudo_dice: List[List[float]], threshold: float = ESCAPE_DICE):
    """The first epoch (0-based) whose pseudo Dice is at least ``threshold`` for every foreground class: when the
    network stops labelling both hippocampus classes as one; None if never."""
    return next((i for i, d in enumerate(pseudo_dice) if d and min(d) >= threshold), None)


def training_dynamics(result: Dict, out: str) -> List[Dict]:
    """One row per training run in ``result`` whose nnU-Net log is in ``out/logs``: method, date, escape epoch,
    the lowest class pseudo Dice per epoch, the last training loss and the run's Dice (nnU-Net's validation)."""
    rows = []
    for name, latest in result["methods"].items():
        for run in [latest] + result.get("earlier_runs", {}).get(name, []):
            date = run.get("date") or (training_start(run["trainer"], out) if run is latest else "")
            stamp = date.replace("-", "_").replace(" ", "_").replace(":", "_").replace("_UTC", "")
            logs = sorted(glob.glob(os.path.join(out, "logs", f"{run['trainer']}_training_log_{stamp}_*.txt")))
            if run.get("training", {}).get("log"):
                logs = [p for p in [os.path.join(out, "logs", run["training"]["log"])] if os.path.isfile(p)]
            if not stamp or stamp == "unknown" or not logs:
                continue
            curve = pseudo_dice_curve(logs[0])
            dice = run["modes"].get("mirror")
            rows.append({"method": name, "date": run_label(dict(run, date=date)),
                         "escape_epoch": escape_epoch(curve["pseudo_dice"]),
                         "min_class_pseudo_dice": [min(d) if d else None for d in curve["pseudo_dice"]],
                         "last_train_loss": curve["train_loss"][-1] if curve["train_loss"] else None,
                         "dice": float(np.mean(list(dice.values()))) if dice else None,
                         "log": os.path.basename(logs[0])})
    return rows


def write_tables(result: Dict, out: str) -> None:
    """accuracy.md from accuracy.json (and diagnosis.json): every number comes from those files."""
    from nnunet_diffusion.machine import describe
    methods = result["methods"]
    b = result["budget"]
    lines = [f"# Accuracy study: {result['dataset']} {result['configuration']}, fold {result['fold']} "
             f"({result['num_cases']} validation cases)", "",
             f"Budget {b['epochs']} epochs x {b['iterations']} iterations at batch {b['batch_size']} for every "
             f"trainer; {describe(result['device'], result['machine'])}. {runs_sentence(result)}", "",
             f"Command: `{result['command']}`", "",
             "Mean foreground Dice over cases; Δ and p (paired t-test, α = 0.01) against stock nnU-Net "
             "(`nnUNetTrainer`) in the same mirroring mode. `mirror`: nnU-Net's final validation with its default "
             "mirroring (both methods), with the trainer's own output (the last step's x0_hat, or, shown as `mirror, mean of K`, the mean "
             "probability of all K steps' x0_hat); `off`: no mirroring, the last step; "
             "`off_meanM`: no mirroring, output = mean probability of the last M steps.", "",
             "| method | mode | Dice | Δ vs stock | p | training s |", "|---|---|---|---|---|---|"]
    stock = methods.get("nnUNetTrainer")
    for name, e in methods.items():
        for mode, dice in e["modes"].items():
            ref_mode = "mirror" if mode == "mirror" else "off"
            cells = ["–", "–"]
            if stock is not None and name != "nnUNetTrainer" and ref_mode in stock["modes"]:
                _, _, delta, p = paired(dice, stock["modes"][ref_mode])
                cells = [f"{delta:+.4f}", f"{p:.2g}"]
            lines.append(f"| {name} | {mode_label(e['trainer'], mode)} | {np.mean(list(dice.values())):.4f} | "
                         f"{cells[0]} | {cells[1]} | "
                         f"{e['training']['training_s']:.0f} |")
    for ref_name, what, rule in REFERENCES:
        ref_entry = methods.get(ref_name)
        if ref_entry is None:
            continue
        # every training run of the reference: a candidate against one run alone would be against that run's luck
        ref_runs = [ref_entry] + result.get("earlier_runs", {}).get(ref_name, [])
        heads = ([f"{ref_name}'s Dice", "Δ", "p"] if len(ref_runs) == 1 else
                 [f"Δ vs run {run_label(r, 'latest')} (Dice; p)" for r in ref_runs])
        lines += ["", f"## Candidates against {what} (`{ref_name}`)", "",
                  f"Same mode for both; Δ and p: paired t-test over cases (α = 0.01). {rule}",
                  "", "| method | mode | Dice | " + " | ".join(heads) + " |", "|---|---|---|" + "---|" * len(heads)]
        for name, e in methods.items():
            if not name.startswith("Diffusion") or name in (ref_name, "DiffusionTrainer_paper"):
                continue
            for mode, dice in e["modes"].items():
                refs = [r["modes"].get(mode) for r in ref_runs]
                if not any(refs):
                    continue
                cells = []
                for ref in refs:
                    if not ref:
                        cells.append("–")
                        continue
                    a, r, delta, p = paired(dice, ref)
                    cells.append(f"{r:.4f} | {delta:+.4f} | {p:.2g}" if len(ref_runs) == 1
                                 else f"{delta:+.4f} ({r:.4f}; {p:.2g})")
                lines.append(f"| {name} | {mode_label(e['trainer'], mode)} | {np.mean(list(dice.values())):.4f} | "
                             + " | ".join(cells) + " |")
    earlier = result.get("earlier_runs", {})
    if earlier:
        lines += ["", "## Run-to-run variation: earlier training runs of the same trainer", "",
                  "Same plans, split and budget, another training run (nnU-Net does not fix its seeds). Δ and p: "
                  "the earlier run against the run in the table above, same mode, paired over cases.", "",
                  "| method | run | mode | Dice | Δ vs the run above | p |", "|---|---|---|---|---|---|"]
        for name, runs in earlier.items():
            for run in runs:
                for mode, dice in run["modes"].items():
                    ref = methods.get(name, {}).get("modes", {}).get(mode)
                    cells = ["–", "–"]
                    if ref:
                        _, _, delta, p = paired(dice, ref)
                        cells = [f"{delta:+.4f}", f"{p:.2g}"]
                    lines.append(f"| {name} | {run_label(run)} | {mode} | "
                                 f"{np.mean(list(dice.values())):.4f} | {cells[0]} | {cells[1]} |")
    stock_runs = ([stock] + earlier.get("nnUNetTrainer", [])) if stock else []
    stock_mean = run_mean(result, "nnUNetTrainer") if len(stock_runs) > 1 else {}
    if len(stock_runs) > 1:
        dates = [run_label(stock, "latest")] + [run_label(r) for r in stock_runs[1:]]
        lines += ["", "## Against every stock run and their mean", "",
                  f"Stock was trained {len(stock_runs)} times ({', '.join(dates)}); its runs differ from each other "
                  "(table above), so a paired test against one run understates the training noise. Δ (p): the method "
                  "against each stock run, and against the per-case mean Dice of all stock runs, same mirroring mode "
                  "(stock `off` for the unmirrored modes); a method trained more than once has a row per run "
                  "(its start time), the latest first.", "",
                  "| method | mode | Dice | " + " | ".join(f"Δ vs stock {d} (p)" for d in dates) +
                  " | Δ vs the stock mean (p) |", "|---|---|---|" + "---|" * (len(dates) + 1)]
        for name, e in methods.items():
            if name == "nnUNetTrainer":
                continue
            runs = [e] + earlier.get(name, [])
            for run in runs:
                label = name if len(runs) == 1 else f"{name}, {run_label(run, 'latest')}"
                for mode, dice in run["modes"].items():
                    ref_mode = "mirror" if mode == "mirror" else "off"
                    refs = [r["modes"].get(ref_mode) for r in stock_runs]
                    have = [r for r in refs if r is not None]
                    if not have:
                        continue
                    # a stock run validated without this mode (--validation-only) has no cell; the mean is over
                    # the stock runs that have the mode
                    mean = case_mean(have)
                    cells = []
                    for r in refs + [mean]:
                        if r is None:
                            cells.append("–")
                            continue
                        _, _, delta, p = paired(dice, r)
                        cells.append(f"{delta:+.4f} ({p:.2g})" + (f" [{len(have)} runs]" if r is mean and
                                                                   len(have) < len(refs) else ""))
                    lines.append(f"| {label} | {mode_label(e['trainer'], mode)} | "
                                 f"{np.mean(list(dice.values())):.4f} | " + " | ".join(cells) + " |")
    repeated = [name for name in methods if name != "nnUNetTrainer" and earlier.get(name)]
    if repeated and len(stock_runs) > 1:
        lines += ["", "## Over all training runs: per-case mean Dice over a method's runs against stock's", "",
                  f"For each method trained more than once: the Dice of each run, and the per-case mean over its runs "
                  f"against the per-case mean over the {len(stock_runs)} stock runs, same mirroring mode (stock `off` "
                  "for the unmirrored modes); Δ and p: paired t-test over cases (α = 0.01). Averaging runs removes "
                  "part of the training noise that a test against one run cannot see.", "",
                  "| method | mode | runs | Dice of each run | Dice of the run mean | stock run mean | Δ | p |",
                  "|---|---|---|---|---|---|---|---|"]
        for name in repeated:
            runs = [methods[name]] + earlier[name]
            for mode, dice in run_mean(result, name).items():
                ref = stock_mean.get("mirror" if mode == "mirror" else "off")
                if not ref:
                    continue
                a, r, delta, p = paired(dice, ref)
                each = ", ".join(f"{np.mean(list(run['modes'][mode].values())):.4f}" for run in runs)
                lines.append(f"| {name} | {mode_label(methods[name]['trainer'], mode)} | {len(runs)} | {each} | "
                             f"{a:.4f} | {r:.4f} | {delta:+.4f} | {p:.2g} |")
    dynamics = training_dynamics(result, out)
    if dynamics:
        lines += ["", "## Training dynamics: when each run learned to tell the two classes apart", "",
                  f"From each run's nnU-Net training log (`logs/`): escape epoch = the first epoch (0-based) at which "
                  f"nnU-Net's pseudo Dice of every foreground class reaches {ESCAPE_DICE} (before it, the network labels "
                  "the hippocampus as mostly one class); the lowest class pseudo Dice per epoch; the last epoch's "
                  "training loss; the run's validation Dice (`mirror`).", "",
                  "| method | run | escape epoch | lowest class pseudo Dice per epoch | last train loss | Dice |",
                  "|---|---|---|---|---|---|"]
        for r in sorted(dynamics, key=lambda r: (r["method"] != "nnUNetTrainer", r["method"], r["date"])):
            curve = " ".join("–" if v is None else f"{v:.2f}" for v in r["min_class_pseudo_dice"])
            lines.append(f"| {r['method']} | {r['date']} | {'never' if r['escape_epoch'] is None else r['escape_epoch']} "
                         f"| {curve} | {'–' if r['last_train_loss'] is None else format(r['last_train_loss'], '.3f')} | "
                         f"{'–' if r['dice'] is None else format(r['dice'], '.4f')} |")
        escaped = [(r["escape_epoch"], r["dice"]) for r in dynamics if r["dice"] is not None]
        if len(escaped) >= 4 and len({a for a, _ in escaped}) > 1:
            from scipy import stats
            never = 1 + max(len(r["min_class_pseudo_dice"]) for r in dynamics)
            e, d = zip(*[(never if a is None else a, b) for a, b in escaped])
            rho = stats.spearmanr(e, d)
            lines += ["", f"Spearman's rho between escape epoch (never = {never}) and Dice over these {len(escaped)} "
                          f"runs: {rho[0]:.2f} (p = {rho[1]:.2g})."]
    diag_path = os.path.join(out, "diagnosis.json")
    diag = json.load(open(diag_path)) if os.path.isfile(diag_path) else {}
    for name, latest in methods.items():
        # the newest run with the unmirrored predictions (a --validation-only rerun has none)
        e = next((r for r in [latest] + earlier.get(name, []) if "steps" in r), None)
        if e is None:
            continue
        run = "" if e is latest else f", training run of {e.get('date', 'an earlier date')}"
        lines += ["", f"## Per-step diagnosis: {e['trainer']} (no mirroring{run})", "",
                  "| output | Dice | Δ vs the step before (p) | Δ vs the first step (p) |", "|---|---|---|---|"]
        steps = list(e["steps"].items())
        for i, (step, dice) in enumerate(steps):
            gains = "| – | – |"
            if i and len(set(dice) & set(steps[0][1])) > 1:
                before, first = paired(dice, steps[i - 1][1]), paired(dice, steps[0][1])
                gains = f"| {before[2]:+.4f} ({before[3]:.2g}) | {first[2]:+.4f} ({first[3]:.2g}) |"
            lines.append(f"| x0_hat of {step} | {np.mean(list(dice.values())):.4f} {gains}")
        for mode, dice in e["modes"].items():
            if mode.startswith("off"):
                label = "chain output (last step)" if mode == "off" else f"mean of last {mode[8:]} steps"
                lines.append(f"| {label} | {np.mean(list(dice.values())):.4f} | | |")
        if "noise" in diag.get(e["trainer"], {}):
            d = diag[e["trainer"]]
            lines += ["", f"Relative L2 change of the logits between t = 0 and t = 1000 (same image patch and x_t, "
                          f"5 cases): x_t pure noise {d['noise']['mean']:.3f}; x_t = ground truth noised to t = 500 "
                          f"{d['gt_t500']['mean']:.3f}."]
    mirrored = [(name, e["trainer"]) for name, e in methods.items() if "mirrors" in diag.get(e["trainer"], {})]
    if mirrored:
        lines += ["", "## Per-mirroring diagnosis: each of nnU-Net's 8 test-time mirrorings alone, and their mean", "",
                  "Whole cases on the preprocessed grid (no sliding window), mean foreground Dice over the first N "
                  "validation cases (sorted; N per column). Stock: one network evaluation per mirroring; diffusion: one 5-step chain per mirroring (same "
                  "noise), the last step's output and the mean probability of all steps. Mirrored axes are tensor axes "
                  "2-4 (the three spatial axes).", ""]
        cols = [(name, trainer, o) for name, trainer in mirrored for o in diag[trainer]["mirrors"]["mean"]]
        lines += ["| mirroring | " + " | ".join(f"{n} ({o}, N = {len(diag[t]['mirrors']['per_case'][o]['()'])})"
                                                for n, t, o in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for k in diag[cols[0][1]]["mirrors"]["mean"][cols[0][2]]:
            lines.append(f"| {k} | " + " | ".join(f"{diag[t]['mirrors']['mean'][o][k]:.4f}" for _, t, o in cols) + " |")
    with open(os.path.join(out, "accuracy.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
