"""The paper's metrics (METHOD.md section 5) and a paired comparison of two methods.

Per case and foreground class, on label maps in the original image geometry, in mm:
Dice (DS), normalised surface Dice (NSD, tolerance in mm), 95 % Hausdorff distance (HD95, the
larger of the two directed 95th percentiles) and centroid distance (CD).

Empty masks (documented rules, never a silent NaN):
* class absent from both reference and prediction: not scored (left out of every mean);
* class in the reference only (missed) or in the prediction only (false positive): Dice 0, NSD 0,
  HD95 and CD = the image diagonal in mm (the largest distance possible in the image);
* a case's score is the mean over the classes present in the reference; a case whose reference has
  no foreground at all is scored over the classes present in its prediction (each counts as a false
  positive), and a case empty in both gets Dice 1, NSD 1, HD95 0, CD 0.
"""
from __future__ import annotations

import json
import re
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

METRICS = ("dice", "nsd", "hd95", "cd")


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: in the mask with at least one face neighbour outside it (or at the image edge)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _distances_to(surface: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distance in mm of every voxel to the nearest voxel of ``surface``."""
    return ndimage.distance_transform_edt(~surface, sampling=spacing)


def binary_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                   tolerance_mm: float = 1.0) -> Optional[Dict[str, float]]:
    """DS, NSD, HD95 and CD of one binary prediction against one binary reference.

    Returns None when both are empty (nothing to score). See the module docstring for one empty side.
    """
    pred, ref = pred.astype(bool), ref.astype(bool)
    spacing = [float(s) for s in spacing]
    if len(spacing) != pred.ndim or pred.shape != ref.shape:
        raise ValueError(f"shapes {pred.shape} / {ref.shape} and spacing {spacing} do not match")
    if not pred.any() and not ref.any():
        return None
    diagonal = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, spacing))))
    if not pred.any() or not ref.any():
        return {"dice": 0.0, "nsd": 0.0, "hd95": diagonal, "cd": diagonal}
    inter = np.logical_and(pred, ref).sum()
    dice = float(2.0 * inter / (pred.sum() + ref.sum()))
    s_pred, s_ref = _surface(pred), _surface(ref)
    d_pred_to_ref = _distances_to(s_ref, spacing)[s_pred]
    d_ref_to_pred = _distances_to(s_pred, spacing)[s_ref]
    nsd = float(((d_pred_to_ref <= tolerance_mm).sum() + (d_ref_to_pred <= tolerance_mm).sum())
                / (len(d_pred_to_ref) + len(d_ref_to_pred)))
    hd95 = float(max(np.percentile(d_pred_to_ref, 95), np.percentile(d_ref_to_pred, 95)))
    sp = np.asarray(spacing)
    c_pred = np.mean(np.argwhere(pred), axis=0) * sp
    c_ref = np.mean(np.argwhere(ref), axis=0) * sp
    return {"dice": dice, "nsd": nsd, "hd95": hd95, "cd": float(np.linalg.norm(c_pred - c_ref))}


def scored_labels(pred: np.ndarray, ref: Optional[np.ndarray], labels: Sequence[int]) -> List[int]:
    """The labels a case's score averages over: those the reference contains, else (an empty reference) those
    the prediction contains; none when neither contains any."""
    present = [c for c in labels if ref is not None and (ref == c).any()]
    return present or [c for c in labels if (pred == c).any()]


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], labels: Sequence[int],
                 tolerance_mm: float = 1.0) -> Dict:
    """Per-class metrics and the case score (mean over the classes present, module docstring)."""
    per_class: Dict[str, Optional[Dict[str, float]]] = {}
    for c in labels:
        per_class[str(c)] = binary_metrics(pred == c, ref == c, spacing, tolerance_mm)
    present = [str(c) for c in scored_labels(pred, ref, labels)]
    if present:
        score = {m: float(np.mean([per_class[c][m] for c in present])) for m in METRICS}
    else:
        score = {"dice": 1.0, "nsd": 1.0, "hd95": 0.0, "cd": 0.0}
    return {"classes": per_class, "scored_classes": present, "case": score}


def _read(path: str) -> Tuple[np.ndarray, Tuple[float, ...]]:
    import SimpleITK as sitk
    img = sitk.ReadImage(path)
    return sitk.GetArrayFromImage(img), tuple(reversed(img.GetSpacing()))


def _label_files(folder: str, file_ending: str, suffix: str = "") -> Dict[str, str]:
    """Case -> file. ``folder`` is a folder of label files, or an nnU-Net results folder whose
    ``fold_*/validation`` folders hold the cross-validation predictions. With ``suffix`` (e.g. ``"_step5"``),
    only files ``CASE{suffix}{file_ending}`` count, under the name CASE."""
    if not os.path.isdir(folder):
        raise ValueError(f"folder {folder} does not exist")
    folds = sorted(d for d in os.listdir(folder) if d.startswith("fold_")
                   and os.path.isdir(os.path.join(folder, d, "validation")))
    if folds:
        files: Dict[str, str] = {}
        for d in folds:
            files.update(_label_files(os.path.join(folder, d, "validation"), file_ending, suffix))
        return files
    if suffix:
        end = suffix + file_ending
        return {f[:-len(end)]: os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(end)}
    return {f[:-len(file_ending)]: os.path.join(folder, f) for f in sorted(os.listdir(folder))
            if f.endswith(file_ending) and not f.endswith(("_entropy" + file_ending, "_mutual_info" + file_ending))
            and not _STEP_FILE.search(f[:-len(file_ending)])}


_STEP_FILE = re.compile(r"_step[0-9]+$")


def step_suffixes(folder: str, file_ending: str = ".nii.gz") -> List[str]:
    """The ``_step{k}`` suffixes of a ``--save-steps`` prediction folder, first step (largest k) first."""
    ks = {int(m.group(1)) for f in os.listdir(folder) if f.endswith(file_ending)
          for m in [re.search(r"_step([0-9]+)$", f[:-len(file_ending)])] if m}
    return [f"_step{k}" for k in sorted(ks, reverse=True)]


def evaluate_folders(ref_folder: str, pred_folder: str, labels: Optional[Sequence[int]] = None,
                     tolerance_mm: float = 1.0, file_ending: str = ".nii.gz", suffix: str = "") -> Dict:
    """Metrics for every case of ``ref_folder`` that ``pred_folder`` also has (same file name; with ``suffix``,
    the prediction files ``CASE{suffix}``, e.g. one step of ``--save-steps``)."""
    refs, preds = _label_files(ref_folder, file_ending), _label_files(pred_folder, file_ending, suffix)
    cases = [c for c in refs if c in preds]
    if not cases:
        raise ValueError(f"no case of {ref_folder} has a prediction in {pred_folder} (files ending {file_ending})")
    results: Dict[str, Dict] = {}
    found_labels = set()
    loaded = {}
    for c in cases:
        ref, spacing = _read(refs[c])
        pred, pred_spacing = _read(preds[c])
        if ref.shape != pred.shape:
            raise ValueError(f"case {c}: prediction shape {pred.shape} differs from reference {ref.shape}")
        if not np.allclose(spacing, pred_spacing, rtol=1e-4):
            raise ValueError(f"case {c}: prediction spacing {pred_spacing} differs from reference {spacing}")
        loaded[c] = (pred, ref, spacing)
        found_labels |= set(np.unique(ref).tolist()) | set(np.unique(pred).tolist())
    if labels is None:
        labels = sorted(int(v) for v in found_labels if v != 0)
    for c, (pred, ref, spacing) in loaded.items():
        results[c] = case_metrics(pred, ref, spacing, labels, tolerance_mm)
    return {"reference": os.path.abspath(ref_folder), "prediction": os.path.abspath(pred_folder),
            "labels": [int(l) for l in labels], "tolerance_mm": tolerance_mm,
            "missing_predictions": sorted(set(refs) - set(preds)),
            "cases": results, "summary": summarise(results, labels)}


def summarise(results: Dict[str, Dict], labels: Sequence[int]) -> Dict:
    """mean and std over cases of the case scores, and per class over cases where the class was scored."""
    summary = {"num_cases": len(results), "case": {}, "per_class": {}}
    for m in METRICS:
        v = np.array([r["case"][m] for r in results.values()], dtype=float)
        summary["case"][m] = {"mean": float(v.mean()), "std": float(v.std(ddof=0))}
    for c in labels:
        vals = {m: [r["classes"][str(c)][m] for r in results.values() if r["classes"][str(c)] is not None]
                for m in METRICS}
        summary["per_class"][str(c)] = {m: ({"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)}
                                            if v else {"mean": None, "std": None, "n": 0}) for m, v in vals.items()}
    return summary


def paired_tests(a: Sequence[float], b: Sequence[float]) -> Dict[str, Optional[float]]:
    """Paired Student's t-test and Wilcoxon signed-rank test (two-sided) on per-case values."""
    from scipy import stats
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired tests need at least 2 cases in both, got {len(a)} and {len(b)}")
    diff = a - b
    if np.allclose(diff, 0):
        return {"t_statistic": None, "t_pvalue": 1.0, "wilcoxon_statistic": None, "wilcoxon_pvalue": 1.0}
    t = stats.ttest_rel(a, b)
    w = stats.wilcoxon(a, b)
    return {"t_statistic": float(t.statistic), "t_pvalue": float(t.pvalue),
            "wilcoxon_statistic": float(w.statistic), "wilcoxon_pvalue": float(w.pvalue)}


def _fmt(stat: Dict) -> str:
    return "–" if stat.get("mean") is None else f"{stat['mean']:.3f} ({stat['std']:.3f})"


def compare(folder_a: str, folder_b: str, ref_folder: str, out_dir: str, labels: Optional[Sequence[int]] = None,
            names: Optional[Sequence[str]] = None, tolerance_mm: float = 1.0, alpha: float = 0.01,
            file_ending: str = ".nii.gz") -> Dict:
    """Evaluate two prediction folders on the cases both have and write report.md, report.json and
    per_class_dice.png to ``out_dir``."""
    names = list(names) if names else [os.path.basename(os.path.normpath(f)) for f in (folder_a, folder_b)]
    if names[0] == names[1]:
        names = [f"A: {names[0]}", f"B: {names[1]}"]
    ea = evaluate_folders(ref_folder, folder_a, labels, tolerance_mm, file_ending)
    labels = ea["labels"]
    eb = evaluate_folders(ref_folder, folder_b, labels, tolerance_mm, file_ending)
    cases = sorted(set(ea["cases"]) & set(eb["cases"]))
    if len(cases) < 2:
        raise ValueError(f"only {len(cases)} case(s) predicted by both methods; need at least 2")
    ra = {c: ea["cases"][c] for c in cases}
    rb = {c: eb["cases"][c] for c in cases}
    sa, sb = summarise(ra, labels), summarise(rb, labels)
    dice_a = [ra[c]["case"]["dice"] for c in cases]
    dice_b = [rb[c]["case"]["dice"] for c in cases]
    tests = paired_tests(dice_a, dice_b)
    significant = tests["t_pvalue"] < alpha
    better = names[0] if np.mean(dice_a) > np.mean(dice_b) else names[1]
    verdict = (f"{better} has the higher mean Dice and the difference is significant "
               f"(paired t-test p = {tests['t_pvalue']:.3g} < {alpha})" if significant else
               f"no significant difference in Dice (paired t-test p = {tests['t_pvalue']:.3g} >= {alpha})")
    report = {"methods": {names[0]: os.path.abspath(folder_a), names[1]: os.path.abspath(folder_b)},
              "reference": os.path.abspath(ref_folder), "labels": labels, "num_cases": len(cases),
              "cases": cases, "tolerance_mm": tolerance_mm, "alpha": alpha,
              "summary": {names[0]: sa, names[1]: sb},
              "per_case_dice": {names[0]: dice_a, names[1]: dice_b},
              "tests": tests, "significant": bool(significant), "verdict": verdict,
              "per_case": {names[0]: ra, names[1]: rb}}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    lines = [f"# {names[0]} vs {names[1]}", "",
             f"{len(cases)} cases predicted by both, scored against `{os.path.abspath(ref_folder)}`; "
             f"foreground labels {labels}; NSD tolerance {tolerance_mm} mm. Values: mean (std) over cases of the "
             "case score (mean over the foreground classes present in the reference).", "",
             "| method | DS | NSD | HD95 (mm) | CD (mm) |", "|---|---|---|---|---|"]
    for n, s in ((names[0], sa), (names[1], sb)):
        lines.append(f"| {n} | " + " | ".join(_fmt(s["case"][m]) for m in METRICS) + " |")
    lines += ["", "Dice per class, mean (std) over cases where the class is scored:", "",
              "| class | " + " | ".join(names) + " |", "|---|---|---|"]
    for c in labels:
        lines.append(f"| {c} | {_fmt(sa['per_class'][str(c)]['dice'])} | {_fmt(sb['per_class'][str(c)]['dice'])} |")
    tp = "–" if tests["t_statistic"] is None else f"{tests['t_statistic']:.3f}"
    wp = "–" if tests["wilcoxon_statistic"] is None else f"{tests['wilcoxon_statistic']:.1f}"
    lines += ["", f"Paired tests on per-case Dice ({names[0]} − {names[1]}, α = {alpha}):", "",
              f"* Student's paired t-test: t = {tp}, p = {tests['t_pvalue']:.4g}",
              f"* Wilcoxon signed-rank test: W = {wp}, p = {tests['wilcoxon_pvalue']:.4g}", "",
              f"**Verdict:** {verdict}.", "", "Per-class Dice box plots: `per_class_dice.png`."]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _box_plot(ra, rb, labels, names, os.path.join(out_dir, "per_class_dice.png"))
    return report


def _box_plot(ra: Dict, rb: Dict, labels: Sequence[int], names: Sequence[str], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(labels), 3.6))
    data, positions, colors = [], [], []
    for i, c in enumerate(labels):
        for j, (res, color) in enumerate(((ra, "#4c72b0"), (rb, "#dd8452"))):
            data.append([r["classes"][str(c)]["dice"] for r in res.values() if r["classes"][str(c)] is not None])
            positions.append(i * 3 + j)
            colors.append(color)
    bp = ax.boxplot(data, positions=positions, widths=0.8, patch_artist=True)
    for patch, color in zip(bp["boxes"], colors):
        patch.set_facecolor(color)
    ax.set_xticks([i * 3 + 0.5 for i in range(len(labels))])
    ax.set_xticklabels([f"class {c}" for c in labels])
    ax.set_ylabel("Dice")
    ax.set_ylim(-0.02, 1.02)
    ax.legend([bp["boxes"][0], bp["boxes"][1]], names, loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
