"""Run ``nnunet-diffusion experiment`` with the largest equal budget that fits a wall-clock limit.

    python benchmarks/timeboxed_experiment.py table1 -d 4 --seconds 3600 --jobs 4 -device cuda -o OUT

Useful when a machine is yours for a fixed time (a GPU lease, a cluster slot). Every trainer still gets
the same EPOCHS x ITERS budget; only the number of iterations is chosen from a measurement:

1. Calibration: the same table with a tiny budget (``--calibration 2x20``), same ``--jobs``, in a
   throw-away results folder (``OUT/calibration_results``). From each run's nnU-Net log it reads the
   time of the last epoch (per training iteration, counting nnU-Net's I//5 validation iterations) and
   from ``timings.json`` the run's wall time; the difference is the run's fixed cost (start-up, final
   validation, export).
2. Budget: ``--epochs`` epochs (default 10) of I iterations with the slowest run's per-iteration time
   and fixed cost, times a safety factor, fitting what is left of ``--seconds`` after the
   calibration and a reserve for the comparison reports.
3. The real experiment with that budget, in nnU-Net's results folder; ``OUT/timebox.json`` records the
   measurements and the chosen budget.

It measures on the machine it runs on, so the budget it picks is only valid there.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

from nnunet_diffusion.budget import parse_budget, validation_iterations


def _run_table(table, dataset, budget, jobs, device, out, env) -> float:
    cmd = [sys.executable, "-m", "nnunet_diffusion.cli", "experiment", table, "-d", dataset, "--budget", budget,
           "--jobs", str(jobs), "-device", device, "-o", out]
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, env=env, check=True)
    return time.time() - start


def calibrate(out: str, calib_budget: str) -> dict:
    """Per run: seconds per training iteration (last epoch) and fixed cost, from the calibration logs."""
    epochs, iters = parse_budget(calib_budget)
    per_epoch_iters = iters + validation_iterations(iters)
    timings = json.load(open(os.path.join(out, "timings.json")))
    runs = {}
    for key, wall in timings["runs"].items():
        text = open(os.path.join(out, key + ".log")).read()
        epoch_times = [float(t) for t in re.findall(r"Epoch time: ([0-9.]+) s", text)]
        if len(epoch_times) != epochs:
            raise RuntimeError(f"calibration run {key}: expected {epochs} epoch times in its log, "
                               f"found {len(epoch_times)}")
        per_it = epoch_times[-1] / per_epoch_iters
        runs[key] = {"wall_s": wall, "epoch_s": epoch_times, "s_per_iteration": per_it,
                     "fixed_s": max(0.0, wall - epochs * epoch_times[-1])}
    return runs


def choose_iterations(runs: dict, seconds_left: float, epochs: int, safety: float, waves: int) -> int:
    """Largest I such that ``waves`` rounds of the slowest run, fixed + epochs * (I + max(1, I//5)) * s_per_it each,
    fit in safety * seconds_left (jobs >= number of runs: one wave)."""
    worst_fixed = max(r["fixed_s"] for r in runs.values())
    worst_it = max(r["s_per_iteration"] for r in runs.values())
    usable = safety * seconds_left / waves - worst_fixed
    iters = max(0, int(usable / (epochs * worst_it)))  # an upper bound: validation iterations left out
    while iters > 0 and epochs * (iters + validation_iterations(iters)) * worst_it > usable:
        iters -= 1
    return iters


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("table", choices=["table1", "table2"])
    p.add_argument("-d", required=True, help="dataset name or id (planned)")
    p.add_argument("--seconds", type=float, required=True, help="wall-clock limit for everything, calibration included")
    p.add_argument("--epochs", type=int, default=10, help="epochs of the real budget (default 10)")
    p.add_argument("--jobs", type=int, default=1, help="runs training at the same time (default 1)")
    p.add_argument("--calibration", default="2x20", help="EPOCHSxITERS of the calibration runs (default 2x20)")
    p.add_argument("--reserve", type=float, default=60.0, help="seconds kept for the comparison reports (default 60)")
    p.add_argument("--safety", type=float, default=0.85, help="fraction of the time left that training may use")
    p.add_argument("-device", dest="device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("-o", required=True, help="output folder")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.jobs < 1 or not 0 < args.safety <= 1:
        p.error("--epochs and --jobs must be >= 1 and --safety in (0, 1]")
    start = time.time()
    os.makedirs(args.o, exist_ok=True)

    def save(record: dict) -> None:
        with open(os.path.join(args.o, "timebox.json"), "w") as f:
            json.dump(record, f, indent=1)

    calib_out = os.path.join(args.o, "calibration")
    env = dict(os.environ, nnUNet_results=os.path.join(args.o, "calibration_results"))
    calib_wall = _run_table(args.table, args.d, args.calibration, args.jobs, args.device, calib_out, env)
    runs = calibrate(calib_out, args.calibration)
    reports_s = json.load(open(os.path.join(calib_out, "timings.json")))["reports_s"]
    left = args.seconds - (time.time() - start) - max(args.reserve, 1.5 * reports_s)
    waves = -(-len(runs) // args.jobs)
    iters = choose_iterations(runs, left, args.epochs, args.safety, waves)
    record = {"seconds": args.seconds, "calibration_budget": args.calibration, "calibration_wall_s": calib_wall,
              "calibration_runs": runs, "seconds_left_for_training": left, "waves": waves, "epochs": args.epochs,
              "iterations": iters}
    for key, r in sorted(runs.items()):
        print(f"calibration {key}: {r['s_per_iteration']:.3f} s/iteration, fixed {r['fixed_s']:.0f} s", flush=True)
    if iters < 1:
        record["error"] = "no budget fits"
        save(record)
        print(f"not even {args.epochs}x1 fits in the {left:.0f} s left; give more --seconds or fewer --epochs",
              file=sys.stderr)
        return 1
    budget = f"{args.epochs}x{iters}"
    print(f"budget {budget}: {left:.0f} s left for training ({time.time() - start:.0f} s used)", flush=True)
    save(record)
    record["experiment_wall_s"] = _run_table(args.table, args.d, budget, args.jobs, args.device,
                                             os.path.join(args.o, f"{args.table}_{budget}"), dict(os.environ))
    record["total_wall_s"] = time.time() - start
    save(record)
    print(f"done in {record['total_wall_s']:.0f} s of {args.seconds:.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
