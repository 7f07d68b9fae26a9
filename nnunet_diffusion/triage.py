"""Case triage without references (issue 38): which predicted cases are likely to be wrong.

For each case, from its saved class probabilities P ``(C, *spatial)`` (nnU-Net's ``--save_probabilities`` /
``--npz`` files) and its own label map L = argmax P:

* **expected Dice**: for each foreground class c, 2·Σ P_c·[L = c] / (Σ [L = c] + Σ P_c) — the Dice that the
  voxels' own probabilities predict for the label map (the first-order expectation of Dice when each voxel is
  class c with probability P_c); 1 for a class that is neither predicted nor probable; the case's value is the
  mean over the foreground classes;
* **mean uncertainty**: the mean predictive entropy (nats) over the voxels whose background probability is below
  0.9 (the region where the segmentation is decided; the certain background would only dilute it).

``python -m nnunet_diffusion.triage -i FOLDER`` writes ``triage.csv`` (cases sorted by expected Dice, the least likely to be
right first); with ``--summary`` (nnU-Net's ``summary.json`` of the same cases) it also says how well expected Dice
tracks the true Dice: Spearman's rho, the mean absolute error, and the AUROC of flagging the worst 10 % of cases.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

BACKGROUND_CERTAIN = 0.9


def _check_probabilities(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.ndim < 2 or p.shape[0] < 2:
        raise ValueError(f"probabilities must have shape (C >= 2, *spatial), got {p.shape}")
    if not np.isfinite(p).all() or p.min() < -1e-6 or np.abs(p.sum(0) - 1).max() > 1e-3:
        raise ValueError("probabilities must be finite, non-negative and sum to 1 over the class axis")
    return p


def expected_dice(probabilities: np.ndarray) -> float:
    """Mean over foreground classes of 2 Σ P_c [L = c] / (Σ [L = c] + Σ P_c), L = argmax P (module docstring)."""
    p = _check_probabilities(probabilities)
    label = p.argmax(0)
    values = []
    for c in range(1, p.shape[0]):
        mask = label == c
        denominator = mask.sum() + p[c].sum()
        values.append(1.0 if denominator < 1e-12 else float(2 * p[c][mask].sum() / denominator))
    return float(np.mean(values))


def mean_uncertainty(probabilities: np.ndarray) -> float:
    """Mean entropy (nats) over the voxels whose background probability is below 0.9; 0 if there are none."""
    p = _check_probabilities(probabilities)
    region = p[0] < BACKGROUND_CERTAIN
    if not region.any():
        return 0.0
    q = p[:, region]
    return float(-(q * np.log(np.clip(q, 1e-12, None))).sum(0).mean())


def _cases(folder: str) -> List[str]:
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} is not a folder")
    cases = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".npz"))
    if not cases:
        raise ValueError(f"{folder} holds no probability files (*.npz): predict with --save_probabilities "
                         f"(nnUNetv2_predict) or train/validate with --npz")
    return cases


def triage_folder(folder: str, out_csv: Optional[str] = None) -> List[Dict]:
    """One row per case of ``folder`` (``CASE.npz`` with ``probabilities``), sorted by expected Dice (ascending),
    written to ``out_csv`` (default ``folder/triage.csv``)."""
    rows = []
    for case in _cases(folder):
        with np.load(os.path.join(folder, case + ".npz")) as f:
            p = f["probabilities"]
        rows.append({"case": case, "expected_dice": expected_dice(p), "mean_uncertainty": mean_uncertainty(p)})
    rows.sort(key=lambda r: r["expected_dice"])
    out_csv = out_csv or os.path.join(folder, "triage.csv")
    with open(out_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["case", "expected_dice", "mean_uncertainty"])
        w.writeheader()
        w.writerows({**r, "expected_dice": f"{r['expected_dice']:.4f}",
                     "mean_uncertainty": f"{r['mean_uncertainty']:.4f}"} for r in rows)
    return rows


def auroc(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` (higher = more likely positive), ties counted half."""
    s, y = np.asarray(scores, dtype=float), np.asarray(positives, dtype=bool)
    if y.all() or not y.any():
        raise ValueError("AUROC needs at least one positive and one negative case")
    pos, neg = s[y], s[~y]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def true_dice(summary_json: str) -> Dict[str, float]:
    """Per-case foreground-mean Dice from nnU-Net's ``summary.json`` (cases keyed by the prediction's name)."""
    with open(summary_json) as f:
        summary = json.load(f)
    out = {}
    for entry in summary["metric_per_case"]:
        case = os.path.basename(entry["prediction_file"]).split(".")[0]
        dice = [m["Dice"] for m in entry["metrics"].values() if m["Dice"] == m["Dice"]]
        out[case] = float(np.mean(dice)) if dice else float("nan")
    return out


def triage_quality(rows: Sequence[Dict], truth: Dict[str, float], worst: float = 0.1) -> Dict:
    """How well expected Dice tracks the true Dice over the cases in both: Spearman's rho, mean absolute error,
    and the AUROC of flagging the worst ``worst`` share of cases (by true Dice) with a low expected Dice."""
    from scipy.stats import spearmanr
    pairs = [(r["expected_dice"], truth[r["case"]]) for r in rows if r["case"] in truth]
    if len(pairs) < 3:
        raise ValueError(f"need at least 3 cases with a true Dice, got {len(pairs)}")
    e, d = np.array(pairs).T
    n_worst = max(1, int(round(worst * len(d))))
    flagged = np.zeros(len(d), dtype=bool)
    flagged[np.argsort(d, kind="stable")[:n_worst]] = True
    return {"cases": len(d), "spearman_rho": float(spearmanr(e, d).statistic), "mae": float(np.abs(e - d).mean()),
            "auroc_worst": auroc(-e, flagged), "worst_share": worst, "worst_cases": n_worst}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nnunet_diffusion.triage", description=__doc__.split("\n\n")[0])
    parser.add_argument("-i", required=True, help="folder of CASE.npz probability files")
    parser.add_argument("-o", help="CSV to write (default: FOLDER/triage.csv)")
    parser.add_argument("--summary", help="nnU-Net's summary.json of the same cases: also measure the triage")
    parser.add_argument("--quality-out", help="with --summary: also write the measurement to this JSON file")
    args = parser.parse_args(argv)
    try:
        rows = triage_folder(args.i, args.o)
        print(f"wrote {args.o or os.path.join(args.i, 'triage.csv')} ({len(rows)} cases, least likely right first)")
        if args.summary:
            quality = triage_quality(rows, true_dice(args.summary))
            print(json.dumps(quality, indent=1))
            if args.quality_out:
                with open(args.quality_out, "w") as f:
                    json.dump(quality, f, indent=1)
    except (ValueError, OSError) as e:
        parser.exit(2, f"error: {e}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
