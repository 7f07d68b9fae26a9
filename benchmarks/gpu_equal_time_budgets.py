"""The equal-time GPU comparison's two steps around the trainings (``benchmarks/gpu_equal_time.sh``).

    python benchmarks/gpu_equal_time_budgets.py time -o timing.json --trainers nnUNetTrainer DiffusionTrainer_head \
        [--iterations 100] [--seconds 10] [--stock-epochs 50] [--batch-size 2] [-device cuda]
    python benchmarks/gpu_equal_time_budgets.py report --timing timing.json -o DIR \
        --folder nnUNetTrainer=ACC_DIR --folder DiffusionTrainer_head=ACC_DIR ...

``time``: every trainer built once in one process (nnU-Net's own ``on_train_start``: the planned network, its
optimiser, its data loaders with ``nnUNet_n_proc_DA`` workers), one short warm-up, then epochs of ``--iterations``
training steps and ``--iterations // 5`` validation steps (a budget trainer's epoch, what nnU-Net's "Epoch time"
measures), the trainers taking turns (A B C A B C, so that drift of the machine is shared) until each has run
``--seconds`` of timed epochs and at least 2. A trainer's time t is its median epoch; its equal-time budget is
E = round(E_stock x t_stock / t), the first trainer being stock; with ``--finish-by``, E_stock is lowered where
its epochs would not fit before then (``epochs_that_fit``). Writes ``timing.json`` and prints one
``BUDGET TRAINER EPOCHS`` line per trainer on stdout (the shell script reads them).

``report``: after the trainings, from each method's accuracy-protocol folder (``accuracy.json``: every run's
logged epoch times and validation Dice) and the fold folders it names: the realised training time of every run
(sum of its logged epoch times; median epoch x epochs) and each method's ratio to stock, the alone timings
beside them, and for trainers that validate several outputs (``validation_<output>/`` beside ``validation/``,
e.g. ``DiffusionTrainer_head``'s trunk and chain) each output's per-case run mean against stock's and against
the trunk. Writes ``equal_time_runs.json`` and ``equal_time_runs.md``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time
from typing import Dict, List

from study_lib import CONFIG, DATASET_ID, case_mean, paired, prepare, summary_dice, val_images

# realised training-time ratio (method / stock) that counts as equal time (the decision rule's 0.95-1.05)
EQUAL_TIME_TOLERANCE = 0.05


def equal_time_budgets(epoch_s: Dict[str, float], stock_epochs: int, reference: str) -> Dict[str, int]:
    """Epochs per trainer so that its training time (epochs x its epoch time) equals the reference's at
    ``stock_epochs``: round(stock_epochs x t_reference / t), at least 1."""
    if stock_epochs < 1:
        raise ValueError(f"stock epochs must be at least 1, got {stock_epochs}")
    if reference not in epoch_s:
        raise ValueError(f"no epoch time for the reference trainer {reference!r} (have: {', '.join(epoch_s)})")
    bad = {k: v for k, v in epoch_s.items() if not v > 0}
    if bad:
        raise ValueError(f"epoch times must be positive: {bad}")
    return {k: max(1, round(stock_epochs * epoch_s[reference] / v)) for k, v in epoch_s.items()}


def epochs_that_fit(stock_epochs: int, seconds_left: float, reserve_s: float, stock_epoch_wall_s: float) -> int:
    """``stock_epochs``, or fewer (at least 1) where they would not fit: stock trains side by side with the others
    at ``stock_epoch_wall_s`` of wall clock per epoch, and ``reserve_s`` is kept for the runs' start-up and their
    final validations (the equal-time runs end their training about when stock does)."""
    if stock_epoch_wall_s <= 0:
        raise ValueError(f"the wall-clock time of a stock epoch must be positive, got {stock_epoch_wall_s}")
    return max(1, min(stock_epochs, int((seconds_left - reserve_s) // stock_epoch_wall_s)))


def _timed_epoch(tr, n_train: int, n_val: int) -> Dict[str, float]:
    """One epoch as nnU-Net's run_training runs it (without on_epoch_start/end, which only log and checkpoint):
    seconds of the training steps and of the validation steps."""
    import torch

    def sync():
        if tr.device.type == "cuda":
            torch.cuda.synchronize(tr.device)

    tr.on_train_epoch_start()
    sync()
    t0 = time.perf_counter()
    outputs = [tr.train_step(next(tr.dataloader_train)) for _ in range(n_train)]
    sync()
    t1 = time.perf_counter()
    tr.on_train_epoch_end(outputs)
    with torch.no_grad():
        tr.on_validation_epoch_start()
        val = [tr.validation_step(next(tr.dataloader_val)) for _ in range(n_val)]
        tr.on_validation_epoch_end(val)
    sync()
    t2 = time.perf_counter()
    tr.current_epoch += 1
    return {"train_s": t1 - t0, "val_s": t2 - t1, "epoch_s": t2 - t0}


def time_trainers(trainers: List[str], iterations: int, seconds: float, device: str) -> Dict[str, Dict]:
    """Epoch times of every trainer alone on ``device``, taking turns (see the module's doc)."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunet_diffusion.budget import budget_name, validation_iterations
    n_val = validation_iterations(iterations)
    built = {}
    for base in trainers:
        # a budget twin: the base trainer's epoch of `iterations` steps; many epochs so its learning rate stays
        # near the start of the schedule, as in the first epochs of the real runs
        tr = get_trainer_from_args(DATASET_ID, CONFIG, 0, budget_name(base, 1000, iterations),
                                   device=torch.device(device))
        tr.on_train_start()
        _timed_epoch(tr, min(iterations, 10), min(n_val, 2))  # warm-up: allocations, kernel selection
        built[base] = tr
        print(f"{base}: built and warmed up", file=sys.stderr, flush=True)
    runs = {base: [] for base in trainers}
    while True:
        todo = [b for b in trainers if len(runs[b]) < 2 or sum(r["epoch_s"] for r in runs[b]) < seconds]
        if not todo:
            break
        for base in todo:
            r = _timed_epoch(built[base], iterations, n_val)
            runs[base].append(r)
            print(f"{base}: epoch {len(runs[base])} {r['epoch_s']:.2f} s (training steps {r['train_s']:.2f} s)",
                  file=sys.stderr, flush=True)
    for tr in built.values():  # stop the data loaders' workers (nnU-Net's on_train_end would also checkpoint)
        for loader in (tr.dataloader_train, tr.dataloader_val):
            if hasattr(loader, "_finish"):
                loader._finish()
    return {base: {"epochs": r, "epoch_s": statistics.median(x["epoch_s"] for x in r),
                   "train_iter_s": statistics.median(x["train_s"] for x in r) / iterations,
                   "val_iter_s": statistics.median(x["val_s"] for x in r) / n_val}
            for base, r in runs.items()}


def cmd_time(args) -> int:
    from nnunet_diffusion.machine import machine_info
    if args.seconds <= 0 or args.iterations < 1:
        raise ValueError(f"--seconds must be positive and --iterations at least 1, got {args.seconds}, "
                         f"{args.iterations}")
    logs = os.path.join(os.path.dirname(os.path.abspath(args.o)), "timing_logs")
    os.makedirs(logs, exist_ok=True)
    prepare(args.batch_size, os.path.join(logs, "prepare.log"))  # the batch size, before any trainer is built
    if args.protocol_work:  # the validation images' links the protocols would each make, side by side
        val_images(args.fold, args.protocol_work)
    timing = time_trainers(args.trainers, args.iterations, args.seconds, args.device)
    stock_epochs = args.stock_epochs
    if args.finish_by:
        stock_epochs = epochs_that_fit(stock_epochs, args.finish_by - time.time(), args.reserve_s,
                                       args.stock_epoch_wall_s)
        if stock_epochs < args.stock_epochs:
            print(f"# only {stock_epochs} stock epochs fit before the deadline (not {args.stock_epochs})",
                  file=sys.stderr)
    budgets = equal_time_budgets({k: v["epoch_s"] for k, v in timing.items()}, stock_epochs, args.trainers[0])
    result = {"reference": args.trainers[0], "iterations": args.iterations, "seconds": args.seconds,
              "stock_epochs": stock_epochs, "stock_epochs_asked": args.stock_epochs,
              "batch_size": args.batch_size, "device": args.device,
              "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA"), "machine": machine_info(args.device),
              "trainers": timing, "budgets": budgets}
    with open(args.o, "w") as f:
        json.dump(result, f, indent=1)
    t_ref = timing[args.trainers[0]]["epoch_s"]
    for base in args.trainers:
        print(f"# {base}: epoch {timing[base]['epoch_s']:.3f} s alone ({timing[base]['epoch_s'] / t_ref:.2f} x "
              f"stock) -> {budgets[base]} epochs", file=sys.stderr)
        print(f"BUDGET {base} {budgets[base]}")
    return 0


def _run_times(entry: Dict, epochs: int) -> Dict:
    times = entry.get("training", {}).get("epoch_times_s") or []
    med = statistics.median(times) if times else None
    return {"epochs_logged": len(times), "sum_s": round(sum(times), 1),
            "median_epoch_s": med, "median_x_epochs_s": round(med * epochs, 1) if med else None}


def runs_of(acc: Dict, base: str) -> List[Dict]:
    """Every recorded run of ``base`` in an accuracy.json (``methods`` and ``earlier_runs``)."""
    latest = acc.get("methods", {}).get(base)
    return ([latest] if latest else []) + acc.get("earlier_runs", {}).get(base, [])


def output_dice(fold_dir: str) -> Dict[str, Dict[str, float]]:
    """{output: per-case Dice} of a run's final validations: ``validation/`` is the trainer's own output
    ("own"), ``validation_<output>/`` the others (nnU-Net's summary.json of each)."""
    found = {}
    for folder in sorted(glob.glob(os.path.join(fold_dir, "validation*"))):
        summary = os.path.join(folder, "summary.json")
        if os.path.isfile(summary):
            name = os.path.basename(folder)
            found["own" if name == "validation" else name[len("validation_"):]] = summary_dice(summary)
    return found


def build_report(timing: Dict, folders: Dict[str, str], reference: str) -> Dict:
    methods = {}
    for base, folder in folders.items():
        acc_file = os.path.join(folder, "accuracy.json")
        if not os.path.isfile(acc_file):
            methods[base] = {"folder": folder, "runs": [], "missing": "no accuracy.json (no run finished)"}
            continue
        acc = json.load(open(acc_file))
        epochs = acc["budget"]["epochs"]
        runs = []
        for entry in runs_of(acc, base):
            outputs = output_dice(entry["training"]["fold_dir"]) if os.path.isdir(entry["training"]["fold_dir"]) \
                else {}
            outputs.setdefault("own", entry["modes"]["mirror"])
            runs.append({"run": entry.get("run"), "date": entry.get("date"), **_run_times(entry, epochs),
                         "outputs": outputs})
        all_times = [t for e in runs_of(acc, base) for t in e.get("training", {}).get("epoch_times_s") or []]
        med = statistics.median(all_times) if all_times else None
        methods[base] = {"folder": folder, "budget": acc["budget"], "runs": runs,
                         "median_epoch_s": med, "training_s": med * epochs if med else None}
    ref = methods.get(reference, {})
    ref_runs = ref.get("runs") or []
    ref_mean = case_mean([r["outputs"]["own"] for r in ref_runs]) if ref_runs else None
    for base, m in methods.items():
        if not m["runs"]:
            continue
        m["training_time_ratio"] = (m["training_s"] / ref["training_s"]
                                    if m.get("training_s") and ref.get("training_s") else None)
        m["equal_time"] = (abs(m["training_time_ratio"] - 1) <= EQUAL_TIME_TOLERANCE
                           if m["training_time_ratio"] is not None else None)
        names = sorted(set.intersection(*(set(r["outputs"]) for r in m["runs"])))
        means = {o: case_mean([r["outputs"][o] for r in m["runs"]]) for o in names}
        comps = []
        for o in names:
            if ref_mean is not None and base != reference:
                comps.append((o, "stock", *paired(means[o], ref_mean)))
            if "trunk" in means and o != "trunk":
                comps.append((o, "trunk", *paired(means[o], means["trunk"])))
        m["outputs"] = {o: sum(v.values()) / len(v) for o, v in means.items()}
        m["comparisons"] = [{"output": o, "against": a, "dice": float(x), "other": float(y), "delta": float(d),
                             "p": float(p)} for o, a, x, y, d, p in comps]
    return {"timing": timing, "reference": reference, "methods": methods}


def format_report(r: Dict) -> str:
    t = r["timing"]
    ref_t = t["trainers"][r["reference"]]["epoch_s"]
    lines = ["# Equal training time: alone timings, realised training times, outputs", "",
             f"Alone (before the runs, one trainer at a time on the same machine): epochs of {t['iterations']} training "
             f"and {max(1, t['iterations'] // 5)} validation steps at batch {t['batch_size']}, the trainers taking "
             f"turns, at least {t['seconds']} s each; budgets E = round({t['stock_epochs']} x t_stock / t).", "",
             "| trainer | training step s | validation step s | epoch s (median of n) | ratio to stock | budget epochs |",
             "|---|---|---|---|---|---|"]
    for base, v in t["trainers"].items():
        lines.append(f"| {base} | {v['train_iter_s']:.4f} | {v['val_iter_s']:.4f} | {v['epoch_s']:.2f} "
                     f"({len(v['epochs'])}) | {v['epoch_s'] / ref_t:.3f} | {t['budgets'][base]} |")
    lines += ["", "Side by side (all runs at once): each run's logged epoch times (nnU-Net's \"Epoch time\"); a method's "
              "training time = the median epoch time over all its runs x its epochs, and its ratio to stock's "
              f"(equal time: within 1 ± {EQUAL_TIME_TOLERANCE}).", "",
              "| method | budget | run | epochs logged | sum of epoch times s | median epoch s x epochs | Dice (own output) |",
              "|---|---|---|---|---|---|---|"]
    for base, m in r["methods"].items():
        if not m["runs"]:
            lines.append(f"| {base} | – | – | – | – | – | {m.get('missing', '')} |")
            continue
        b = m["budget"]
        for run in m["runs"]:
            own = run["outputs"]["own"]
            med = "–" if run["median_x_epochs_s"] is None else f"{run['median_x_epochs_s']:.0f}"
            lines.append(f"| {base} | {b['epochs']} × {b['iterations']} | {run['run']} | {run['epochs_logged']} | "
                         f"{run['sum_s']:.0f} | {med} | {sum(own.values()) / len(own):.4f} |")
    lines += ["", "| method | training s (median epoch x epochs) | ratio to stock | equal time |", "|---|---|---|---|"]
    for base, m in r["methods"].items():
        if m["runs"] and m.get("training_s"):
            ratio = m.get("training_time_ratio")
            lines.append(f"| {base} | {m['training_s']:.0f} ({m['median_epoch_s']:.2f} x {m['budget']['epochs']}) | "
                         f"{'–' if ratio is None else f'{ratio:.3f}'} | "
                         f"{'–' if m.get('equal_time') is None else ('yes' if m['equal_time'] else 'no')} |")
    lines += ["", "Outputs (per-case mean Dice over a method's runs; `own` = `validation/`, the trainer's output; "
              "Δ and p: paired t-test over the cases, α = 0.01):", "",
              "| method | output | Dice | against | other's Dice | Δ | p |", "|---|---|---|---|---|---|---|"]
    for base, m in r["methods"].items():
        for c in m.get("comparisons", []):
            lines.append(f"| {base} | {c['output']} | {c['dice']:.4f} | {c['against']} | {c['other']:.4f} | "
                         f"{c['delta']:+.4f} | {c['p']:.2g} |")
    return "\n".join(lines) + "\n"


def cmd_report(args) -> int:
    folders = {}
    for spec in args.folder:
        if "=" not in spec:
            raise ValueError(f"--folder {spec!r}: expected TRAINER=FOLDER")
        base, folder = spec.split("=", 1)
        folders[base] = folder
    timing = json.load(open(args.timing))
    report = build_report(timing, folders, timing["reference"])
    os.makedirs(args.o, exist_ok=True)
    md = format_report(report)
    for name, text in (("equal_time_runs.json", json.dumps(report, indent=1)), ("equal_time_runs.md", md)):
        with open(os.path.join(args.o, name), "w") as f:
            f.write(text)
    print(md)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("time", help="time every trainer alone; print its equal-time budget")
    p.add_argument("-o", required=True, help="timing.json")
    p.add_argument("--trainers", nargs="+", required=True, help="the first is stock, the reference")
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--seconds", type=float, default=10.0, help="timed epochs per trainer, at least (default 10)")
    p.add_argument("--stock-epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("-device", default="cuda")
    p.add_argument("--finish-by", type=float, default=None,
                   help="Unix time by which every run should have validated: fewer stock epochs where --stock-epochs "
                        "would not fit (see --stock-epoch-wall-s, --reserve-s)")
    p.add_argument("--stock-epoch-wall-s", type=float, default=4.4,
                   help="wall clock of one stock epoch with all runs side by side (default 4.4: 100 iterations on "
                        "an H200 with 4-8 runs, accuracy_gpu_50x100 and _12x50: 2.6-3.1 s of epoch time plus 1.4 s "
                        "of nnU-Net's logging, plotting and checkpoints)")
    p.add_argument("--reserve-s", type=float, default=190.0,
                   help="seconds kept for the runs' start-up, first epoch and final validations (default 190: "
                        "DiffusionTrainer_head validates three outputs, 40-50 s each)")
    p.add_argument("--protocol-work", help="accuracy_protocol.py's work folder: link the fold's validation images "
                                           "there first, so that protocols started side by side find them")
    p.set_defaults(func=cmd_time)
    p = sub.add_parser("report", help="realised training times and outputs of the runs")
    p.add_argument("--timing", required=True)
    p.add_argument("--folder", action="append", required=True, help="TRAINER=ACCURACY_FOLDER (repeatable)")
    p.add_argument("-o", required=True)
    p.set_defaults(func=cmd_report)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
