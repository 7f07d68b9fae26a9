"""How good is an uncertainty map? Error detection, calibration and case-level quality control.

One scorer for every method, so a diffusion model's maps and stock nnU-Net's softmax entropy are judged by
the same code (``nnunet-diffusion uncertainty``). Per method, a prediction folder holds for every case
``CASE.nii.gz`` (the label map) and either

* ``CASE_entropy.nii.gz`` / ``CASE_mutual_info.nii.gz`` (``nnUNetv2_predict_diffusion --uncertainty``), or
* ``CASE.npz`` (any nnU-Net prediction with ``--save_probabilities``; key ``probabilities``, ``(C, *image)``):
  the map is then the predictive entropy of those probabilities (natural log).

Calibration (ECE, Brier score, reliability diagram) needs probabilities: it is computed when ``CASE.npz``
exists, whatever the map.

Region scored (voxel metrics): the union of reference and predicted foreground, dilated by ``margin_mm``
(Euclidean distance in mm, image spacing), so that the easy background far from the structure, which is
almost all of the image, does not decide the numbers. Outside the region nothing is scored.

Metrics:

* error detection: voxel wrongly labelled = prediction != reference. AUROC (Mann–Whitney, ties count one
  half: a constant map scores exactly 0.5) and AUPRC (average precision over the distinct thresholds; a
  constant map scores the error rate) of the map as a score for "error", pooled over all voxels of all
  cases and per case (mean over the cases that have both errors and correct voxels in the region);
* calibration: top-label ECE (``bins`` equal-width confidence bins, confidence = max probability, correct =
  argmax equals the reference), multi-class Brier score (sum over classes of the squared difference to the
  one-hot reference, mean over voxels), pooled over the region of all cases;
* case-level quality control: the case's uncertainty is the mean of its map over the predicted foreground
  (the whole region if nothing is predicted); Spearman's rho between it and the case Dice (negative is
  good: uncertain cases are the bad ones) and the AUROC of flagging the worst ``ceil(qc_fraction * n)``
  cases (lowest Dice) by it.
* case-level quality control from the probabilities (when ``CASE.npz`` exists): the case's **expected Dice**,
  the Dice its own probabilities predict for its label map: per foreground label l,
  2 * sum(P_l * q_l) / (sum(P_l) + sum(q_l)) with P_l = (prediction == l) and q_l the probability of label l
  (channel l of the npz), averaged over the labels that the reference or the prediction contains (as the case
  Dice is); 1 where neither predicts nor contains any. A perfectly calibrated model's expected Dice tracks its
  Dice. Scored by Spearman's rho with the case Dice (positive is good), the mean absolute difference between
  the two, and the AUROC of flagging the worst cases by the lowest expected Dice.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, Optional, Sequence

import numpy as np
from scipy import ndimage, stats

MAPS = ("entropy", "mutual_info", "probabilities")


# ---------------------------------------------------------------------------------------------- scores
def auroc(score: np.ndarray, positive: np.ndarray) -> Optional[float]:
    """Area under the ROC curve of ``score`` for ``positive`` (ties count one half); None if one class is empty."""
    score = np.asarray(score, dtype=np.float64).ravel()
    positive = np.asarray(positive, dtype=bool).ravel()
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = stats.rankdata(score)  # average ranks for ties
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(score: np.ndarray, positive: np.ndarray) -> Optional[float]:
    """Area under the precision-recall curve as average precision: sum over the distinct thresholds (high to
    low) of (recall increase) x precision. None if there is no positive."""
    score = np.asarray(score, dtype=np.float64).ravel()
    positive = np.asarray(positive, dtype=bool).ravel()
    n_pos = int(positive.sum())
    if n_pos == 0:
        return None
    order = np.argsort(-score, kind="mergesort")
    s, p = score[order], positive[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each group of equal scores
    tp = np.cumsum(p)[last]
    precision = tp / (last + 1.0)
    recall_step = np.diff(np.r_[0, tp]) / n_pos
    return float(np.sum(recall_step * precision))


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> Dict:
    """Equal-width confidence bins on [0, 1]: count, mean confidence and accuracy per bin, and the ECE
    (sum over bins of count/N x |accuracy - confidence|)."""
    confidence = np.asarray(confidence, dtype=np.float64).ravel()
    correct = np.asarray(correct, dtype=np.float64).ravel()
    if confidence.size == 0:
        raise ValueError("no voxels to compute the calibration on")
    index = np.clip((confidence * bins).astype(np.int64), 0, bins - 1)
    count = np.bincount(index, minlength=bins).astype(np.float64)
    conf_sum = np.bincount(index, confidence, minlength=bins)
    acc_sum = np.bincount(index, correct, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf, accuracy = conf_sum / count, acc_sum / count
    ece = float(np.sum(np.abs(acc_sum - conf_sum)) / confidence.size)
    return {"ece": ece, "bins": bins, "count": count.astype(int).tolist(),
            "confidence": [None if c == 0 else float(v) for c, v in zip(count, mean_conf)],
            "accuracy": [None if c == 0 else float(v) for c, v in zip(count, accuracy)]}


def brier(probabilities: np.ndarray, reference: np.ndarray) -> float:
    """Multi-class Brier score: mean over voxels of sum_c (p_c - [ref == c])^2. ``probabilities`` is ``(C, N)``."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    onehot = np.zeros_like(probabilities)
    onehot[np.asarray(reference, dtype=np.int64), np.arange(probabilities.shape[1])] = 1.0
    return float(np.mean(np.sum((probabilities - onehot) ** 2, axis=0)))


def entropy_of(probabilities: np.ndarray, axis: int = 0) -> np.ndarray:
    """Predictive entropy (natural log) over ``axis``."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)
    return -np.sum(p * np.log(p), axis=axis)


def expected_dice(probabilities: np.ndarray, pred: np.ndarray, labels: Sequence[int],
                  ref: Optional[np.ndarray] = None) -> float:
    """The Dice that ``probabilities`` (C, *image) expect for the label map ``pred`` (module docstring):
    the mean over the labels present in ``ref`` (else in ``pred``) of 2 sum(P q) / (sum(P) + sum(q))."""
    if probabilities.shape[0] <= max(labels):
        raise ValueError(f"probabilities have {probabilities.shape[0]} channels; label {max(labels)} needs "
                         f"channel {max(labels)}")
    from nnunet_diffusion.evaluation import scored_labels
    scored = scored_labels(pred, ref, labels)
    if not scored:
        return 1.0
    values = []
    for l in scored:
        mask = pred == l
        q = probabilities[l].astype(np.float64)
        denominator = mask.sum() + q.sum()
        values.append(2.0 * q[mask].sum() / denominator if denominator > 0 else 1.0)
    return float(np.mean(values))


def region_of(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float], margin_mm: float) -> np.ndarray:
    """Reference or predicted foreground, dilated by ``margin_mm`` (Euclidean, in mm)."""
    foreground = (ref > 0) | (pred > 0)
    if not foreground.any():
        return foreground
    if margin_mm <= 0:
        return foreground
    return ndimage.distance_transform_edt(~foreground, sampling=[float(s) for s in spacing]) <= margin_mm


# ---------------------------------------------------------------------------------------------- reading
def _read(path: str):
    import SimpleITK as sitk
    img = sitk.ReadImage(path)
    return sitk.GetArrayFromImage(img), tuple(reversed(img.GetSpacing()))


def _load_probabilities(path: str, shape) -> np.ndarray:
    with np.load(path) as f:
        if "probabilities" not in f:
            raise ValueError(f"{path} has no 'probabilities' array (write it with --save_probabilities)")
        probs = f["probabilities"].astype(np.float32)
    if tuple(probs.shape[1:]) != tuple(shape):
        raise ValueError(f"{path}: probabilities {probs.shape} do not match the label map {tuple(shape)}")
    return probs


def _uncertainty_of(files: Dict, shape, probs: Optional[np.ndarray] = None) -> np.ndarray:
    """A method's map for one case: its map file, or the entropy of its probabilities (``probs``, else its npz)."""
    if files["map"] is not None:
        unc, _ = _read(files["map"])
        if unc.shape != tuple(shape):
            raise ValueError(f"{files['map']}: map shape {unc.shape} differs from the reference {tuple(shape)}")
        return unc.astype(np.float64)
    return entropy_of(probs if probs is not None else _load_probabilities(files["npz"], shape), 0)


def method_cases(ref_folder: str, pred_folder: str, map_name: str, file_ending: str = ".nii.gz") -> Dict[str, Dict]:
    """Case -> files of one method: {'ref', 'pred', 'map' (None: entropy of the npz), 'npz' (or None)}."""
    from nnunet_diffusion.evaluation import _label_files
    if map_name not in MAPS:
        raise ValueError(f"map must be one of {MAPS}, got {map_name!r}")
    refs, preds = _label_files(ref_folder, file_ending), _label_files(pred_folder, file_ending)
    cases: Dict[str, Dict] = {}
    missing = []
    for c in sorted(set(refs) & set(preds)):
        folder = os.path.dirname(preds[c])
        npz = os.path.join(folder, c + ".npz")
        npz = npz if os.path.isfile(npz) else None
        if map_name == "probabilities":
            unc = None
            if npz is None:
                missing.append(f"{c}.npz")
                continue
        else:
            unc = os.path.join(folder, f"{c}_{map_name}{file_ending}")
            if not os.path.isfile(unc):
                missing.append(os.path.basename(unc))
                continue
        cases[c] = {"ref": refs[c], "pred": preds[c], "map": unc, "npz": npz}
    if not cases:
        hint = ("predict with --save_probabilities" if map_name == "probabilities" else
                "predict with nnUNetv2_predict_diffusion --uncertainty, or use --probabilities with a "
                "--save_probabilities folder")
        raise ValueError(f"{pred_folder}: no case has a prediction and its {map_name} map "
                         f"(missing e.g. {', '.join(missing[:3]) or 'all predictions'}); {hint}")
    if missing:
        raise ValueError(f"{pred_folder}: {len(missing)} case(s) lack their {map_name} map, e.g. "
                         f"{', '.join(missing[:3])}")
    return cases


# ---------------------------------------------------------------------------------------------- scoring
def score_method(cases: Dict[str, Dict], labels: Optional[Sequence[int]] = None, margin_mm: float = 3.0,
                 bins: int = 15, qc_fraction: float = 0.1) -> Dict:
    """Every metric of the module docstring for one method (``cases`` from :func:`method_cases`)."""
    from nnunet_diffusion.evaluation import case_metrics
    loaded = {}
    found = set()
    for c, files in cases.items():
        ref, spacing = _read(files["ref"])
        pred, _ = _read(files["pred"])
        if ref.shape != pred.shape:
            raise ValueError(f"case {c}: prediction shape {pred.shape} differs from reference {ref.shape}")
        loaded[c] = (ref, pred, spacing)
        found |= set(np.unique(ref).tolist()) | set(np.unique(pred).tolist())
    if labels is None:
        labels = sorted(int(v) for v in found if v != 0)
    scores, errors, conf, correct = [], [], [], []
    brier_sum, n_cal = 0.0, 0
    per_case: Dict[str, Dict] = {}
    for c, (ref, pred, spacing) in loaded.items():
        files = cases[c]
        probs = _load_probabilities(files["npz"], ref.shape) if files["npz"] else None
        unc = _uncertainty_of(files, ref.shape, probs)
        if not np.isfinite(unc).all():
            raise ValueError(f"case {c}: the uncertainty map has NaN or Inf values")
        region = region_of(ref, pred, spacing, margin_mm)
        err = (pred != ref)[region]
        u = unc[region]
        scores.append(u)
        errors.append(err)
        fg = pred > 0
        case_unc = float(unc[fg].mean()) if fg.any() else (float(u.mean()) if u.size else 0.0)
        entry = {"dice": case_metrics(pred, ref, spacing, labels)["case"]["dice"],
                 "mean_uncertainty": case_unc, "region_voxels": int(region.sum()),
                 "error_rate": float(err.mean()) if err.size else 0.0,
                 "auroc": auroc(u, err), "auprc": average_precision(u, err)}
        if probs is not None:
            p = probs[:, region]
            top = p.argmax(0)
            conf.append(p.max(0))
            correct.append(top == ref[region])
            b = brier(p, ref[region]) if p.shape[1] else 0.0
            brier_sum += b * p.shape[1]
            n_cal += p.shape[1]
            entry["brier"] = b
            entry["expected_dice"] = expected_dice(probs, pred, labels, ref)
            entry["expected_dice_error"] = abs(entry["expected_dice"] - entry["dice"])
        per_case[c] = entry
    s, e = np.concatenate(scores), np.concatenate(errors)
    case_aurocs = [v["auroc"] for v in per_case.values() if v["auroc"] is not None]
    case_auprcs = [v["auprc"] for v in per_case.values() if v["auprc"] is not None]
    result = {"labels": [int(l) for l in labels], "num_cases": len(per_case), "margin_mm": margin_mm,
              "region_voxels": int(s.size), "error_rate": float(e.mean()) if e.size else 0.0,
              "voxel": {"auroc": auroc(s, e), "auprc": average_precision(s, e),
                        "auroc_case_mean": float(np.mean(case_aurocs)) if case_aurocs else None,
                        "auprc_case_mean": float(np.mean(case_auprcs)) if case_auprcs else None},
              "calibration": None, "qc": qc_scores(per_case, qc_fraction),
              "qc_expected_dice": (expected_dice_qc(per_case, qc_fraction)
                                   if all("expected_dice" in v for v in per_case.values()) else None),
              "per_case": per_case}
    if len(conf) == len(per_case) and n_cal:
        rel = reliability(np.concatenate(conf), np.concatenate(correct), bins)
        result["calibration"] = {"ece": rel["ece"], "brier": brier_sum / n_cal, "reliability": rel}
    dice = [v["dice"] for v in per_case.values()]
    result["dice"] = {"mean": float(np.mean(dice)), "std": float(np.std(dice))}
    return result


def qc_scores(per_case: Dict[str, Dict], fraction: float = 0.1) -> Dict:
    """Spearman's rho (case mean uncertainty vs Dice) and the AUROC of flagging the worst cases."""
    cases = sorted(per_case)
    if len(cases) < 3:
        return {"spearman": None, "spearman_p": None, "worst_auroc": None, "worst_cases": []}
    dice = np.array([per_case[c]["dice"] for c in cases])
    unc = np.array([per_case[c]["mean_uncertainty"] for c in cases])
    n_worst = max(1, math.ceil(fraction * len(cases)))
    worst = np.zeros(len(cases), dtype=bool)
    worst[np.argsort(dice, kind="mergesort")[:n_worst]] = True
    if np.ptp(unc) == 0 or np.ptp(dice) == 0:
        rho, p = None, None
    else:
        r = stats.spearmanr(unc, dice)
        rho, p = float(r.statistic if hasattr(r, "statistic") else r[0]), float(r.pvalue)
    return {"spearman": rho, "spearman_p": p, "fraction": fraction, "worst_auroc": auroc(unc, worst),
            "worst_cases": [c for c, w in zip(cases, worst) if w]}


def expected_dice_qc(per_case: Dict[str, Dict], fraction: float = 0.1) -> Dict:
    """Case QC by the expected Dice: Spearman's rho with the Dice (positive is good), the mean absolute
    difference of the two, and the AUROC of flagging the worst cases by the lowest expected Dice."""
    cases = sorted(per_case)
    expected = np.array([per_case[c]["expected_dice"] for c in cases])
    dice = np.array([per_case[c]["dice"] for c in cases])
    flipped = qc_scores({c: {"dice": per_case[c]["dice"], "mean_uncertainty": -per_case[c]["expected_dice"]}
                         for c in cases}, fraction)
    rho = None if flipped["spearman"] is None else -flipped["spearman"]
    return {"spearman": rho, "spearman_p": flipped["spearman_p"], "fraction": fraction,
            "mean_abs_error": float(np.abs(expected - dice).mean()), "mean_expected_dice": float(expected.mean()),
            "worst_auroc": flipped["worst_auroc"], "worst_cases": flipped["worst_cases"]}


PAIRED_METRICS = ("auroc", "auprc", "brier", "expected_dice_error", "dice")


def paired_against(first: Dict, other: Dict) -> Dict[str, Dict]:
    """Per-case metrics of ``other`` against ``first`` (two :func:`score_method` results on the same cases):
    {metric: {n, mean, reference_mean, delta, t_pvalue, wilcoxon_pvalue}} over the cases where both have the
    metric. Each method is scored against its own errors, so AUROC/AUPRC compare how well each map finds its
    own model's errors; Brier needs probabilities for both."""
    from nnunet_diffusion.evaluation import paired_tests
    out: Dict[str, Dict] = {}
    for metric in PAIRED_METRICS:
        cases = sorted(c for c in set(first["per_case"]) & set(other["per_case"])
                       if first["per_case"][c].get(metric) is not None
                       and other["per_case"][c].get(metric) is not None)
        if len(cases) < 2:
            continue
        a = [other["per_case"][c][metric] for c in cases]
        b = [first["per_case"][c][metric] for c in cases]
        tests = paired_tests(a, b)
        out[metric] = {"n": len(cases), "mean": float(np.mean(a)), "reference_mean": float(np.mean(b)),
                       "delta": float(np.mean(a) - np.mean(b)), "t_pvalue": tests["t_pvalue"],
                       "wilcoxon_pvalue": tests["wilcoxon_pvalue"]}
    return out


# ---------------------------------------------------------------------------------------------- report
def _f(v, digits=3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def uncertainty_report(ref_folder: str, pred_folders: Sequence[str], out_dir: str,
                       maps: Sequence[str] = ("entropy",), names: Optional[Sequence[str]] = None,
                       labels: Optional[Sequence[int]] = None, margin_mm: float = 3.0, bins: int = 15,
                       qc_fraction: float = 0.1, file_ending: str = ".nii.gz") -> Dict:
    """Score one or more methods on the cases all of them have; write report.json, report.md and
    reliability.png to ``out_dir``."""
    pred_folders = list(pred_folders)
    maps = list(maps)
    if len(maps) == 1:
        maps = maps * len(pred_folders)
    if len(maps) != len(pred_folders):
        raise ValueError(f"give one map for all methods or one per method: {len(maps)} maps for "
                         f"{len(pred_folders)} prediction folders")
    if names is None:
        names = [f"{os.path.basename(os.path.normpath(p))} ({m})" for p, m in zip(pred_folders, maps)]
    names = list(names)
    if len(names) != len(pred_folders) or len(set(names)) != len(names):
        raise ValueError(f"--names needs one distinct name per prediction folder, got {names}")
    if not 0 < qc_fraction < 1:
        raise ValueError(f"qc fraction must be in (0, 1), got {qc_fraction}")
    if margin_mm < 0:
        raise ValueError(f"margin must be >= 0 mm, got {margin_mm}")
    per_method = [method_cases(ref_folder, p, m, file_ending) for p, m in zip(pred_folders, maps)]
    common = sorted(set.intersection(*(set(c) for c in per_method)))
    if not common:
        raise ValueError("no case is scored by every method")
    if labels is None:
        from nnunet_diffusion.evaluation import _label_files
        found = set()
        refs = _label_files(ref_folder, file_ending)
        for c in common:
            found |= set(np.unique(_read(refs[c])[0]).tolist())
        labels = sorted(int(v) for v in found if v != 0)
    methods = {}
    for name, folder, m, cases in zip(names, pred_folders, maps, per_method):
        print(f"scoring {name}: {len(common)} cases", flush=True)
        r = score_method({c: cases[c] for c in common}, labels, margin_mm, bins, qc_fraction)
        r.update({"folder": os.path.abspath(folder), "map": m})
        methods[name] = r
    first = names[0]
    paired = {name: paired_against(methods[first], r) for name, r in methods.items() if name != first}
    report = {"reference": os.path.abspath(ref_folder), "cases": common, "labels": [int(l) for l in labels],
              "margin_mm": margin_mm, "bins": bins, "qc_fraction": qc_fraction, "methods": methods,
              "paired_vs_first": paired}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    lines = [f"# Uncertainty: {' vs '.join(names)}", "",
             f"{len(common)} cases scored against `{os.path.abspath(ref_folder)}`, foreground labels "
             f"{list(labels)}. Voxel metrics over the reference or predicted foreground dilated by {margin_mm} mm "
             "(pooled over cases); the map scores 'voxel wrongly labelled'. ECE: top-label, "
             f"{bins} bins. Case QC: Spearman's rho of the case's mean uncertainty over its predicted foreground "
             f"with its Dice (negative is good), AUROC of flagging the worst {qc_fraction:.0%} of cases. "
             "Expected Dice (needs the probabilities): the Dice a case's probabilities predict for its label "
             "map; Spearman's rho with the Dice (positive is good), mean |expected - Dice|, AUROC of flagging "
             "the worst cases by the lowest expected Dice.", "",
             "| method | map | Dice | voxel AUROC | AUPRC | error rate | ECE | Brier | case-QC Spearman | "
             "worst-case AUROC | expected Dice | its Spearman | its mean abs. error | its worst-case AUROC |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in methods.items():
        cal = r["calibration"] or {}
        ed = r["qc_expected_dice"] or {}
        lines.append(f"| {name} | {r['map']} | {_f(r['dice']['mean'])} | {_f(r['voxel']['auroc'])} | "
                     f"{_f(r['voxel']['auprc'])} | {_f(r['error_rate'])} | {_f(cal.get('ece'), 4)} | "
                     f"{_f(cal.get('brier'), 4)} | {_f(r['qc']['spearman'])} | {_f(r['qc']['worst_auroc'])} | "
                     f"{_f(ed.get('mean_expected_dice'), 4)} | {_f(ed.get('spearman'))} | "
                     f"{_f(ed.get('mean_abs_error'), 4)} | {_f(ed.get('worst_auroc'))} |")
    lines += ["", "Calibration needs `CASE.npz` (`--save_probabilities`); – where a method has none. "
              "Reliability diagram: `reliability.png`."]
    if paired:
        lines += ["", f"## Per case, against {first}", "",
                  f"Mean over cases of each case's metric, the method minus `{first}`; p: paired t-test and Wilcoxon "
                  "signed-rank test over cases (two-sided). Each map is scored against its own model's errors. "
                  "Higher is better for AUROC, AUPRC and Dice, lower for Brier and expected_dice_error "
                  "(|expected Dice - Dice|).", "",
                  "| method | metric | cases | method | " + first + " | Δ | t-test p | Wilcoxon p |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, tests in paired.items():
            for metric, t in tests.items():
                lines.append(f"| {name} | {metric} | {t['n']} | {t['mean']:.4f} | {t['reference_mean']:.4f} | "
                             f"{t['delta']:+.4f} | {t['t_pvalue']:.2g} | {t['wilcoxon_pvalue']:.2g} |")
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _reliability_plot(methods, os.path.join(out_dir, "reliability.png"))
    return report


def _reliability_plot(methods: Dict[str, Dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect calibration")
    plotted = False
    for name, r in methods.items():
        if not r["calibration"]:
            continue
        rel = r["calibration"]["reliability"]
        pts = [(c, a) for c, a in zip(rel["confidence"], rel["accuracy"]) if c is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3,
                label=f"{name} (ECE {r['calibration']['ece']:.3f})")
        plotted = True
    if not plotted:
        ax.text(0.5, 0.5, "no probabilities (--save_probabilities)", ha="center", va="center", fontsize=8)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def case_panels(image_file: str, method_files: Sequence[Dict]) -> Dict:
    """The arrays of :func:`example_figure` for one case: ``method_files`` are entries of :func:`method_cases`
    (one per method, the same case). Returns the axial slice with the most reference foreground, the image,
    the reference, and per method its prediction, uncertainty map (its file, or the entropy of its npz) and
    the voxels where prediction and reference disagree, all on that slice."""
    ref, _ = _read(method_files[0]["ref"])
    image, _ = _read(image_file)
    if image.shape != ref.shape:
        raise ValueError(f"{image_file}: image shape {image.shape} differs from the reference {ref.shape}")
    z = int(np.argmax((ref > 0).sum(axis=(1, 2))))
    rows = []
    for files in method_files:
        pred, _ = _read(files["pred"])
        unc = _uncertainty_of(files, ref.shape)
        rows.append({"prediction": pred[z], "uncertainty": unc[z], "errors": pred[z] != ref[z]})
    return {"slice": z, "image": image[z], "reference": ref[z], "methods": rows}


def example_figure(image_file: str, method_files: Sequence[Dict], names: Sequence[str], path: str,
                   title: str = "") -> int:
    """One case, one row per method: image with the reference, the method's prediction, its uncertainty map and
    its errors (prediction != reference) on the axial slice with the most reference foreground. All
    uncertainty panels share one colour scale (0 to the largest value shown). Returns the slice index."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = case_panels(image_file, method_files)
    vmax = max(float(r["uncertainty"].max()) for r in panels["methods"]) or 1.0
    labels = matplotlib.colors.ListedColormap([(0, 0, 0, 0), (0.95, 0.3, 0.2, 0.6), (0.2, 0.6, 1.0, 0.6)])
    wrong = matplotlib.colors.ListedColormap([(0, 0, 0, 0), (1.0, 0.9, 0.1, 0.9)])
    n = len(panels["methods"])
    fig, axes = plt.subplots(n, 4, figsize=(12, 3.1 * n), squeeze=False)
    img = panels["image"]
    for row, (name, r) in enumerate(zip(names, panels["methods"])):
        shown = [("image + reference", panels["reference"], labels), (f"{name}: prediction", r["prediction"], labels),
                 (f"{name}: uncertainty", None, None),
                 (f"{name}: errors ({int(r['errors'].sum())} voxels)", r["errors"].astype(np.uint8), wrong)]
        for ax, (label, overlay, cmap) in zip(axes[row], shown):
            ax.imshow(img, cmap="gray")
            if overlay is not None:
                ax.imshow(np.clip(overlay, 0, cmap.N - 1), cmap=cmap, vmin=0, vmax=cmap.N - 1,
                          interpolation="nearest")
            else:
                im = ax.imshow(r["uncertainty"], cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
            ax.set_title(label, fontsize=8)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return panels["slice"]
