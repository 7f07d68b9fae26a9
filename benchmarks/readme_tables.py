"""The study document's copies of result tables, and the README's linked numbers, against the committed results.

    python benchmarks/readme_tables.py            # rewrite each copied table in docs/STUDY.md from its results file
    python benchmarks/readme_tables.py --check    # exit 1 and name every copy that differs from its results file

Tables: each entry of ``TABLES`` names a results file, the heading in it under which the table stands (the first
table after that heading), and the first cells of the copy's header row, which find the copy in
``docs/STUDY.md``. Numbers are compared as written; the document writes a minus sign (U+2212) where the results
files write "-", and may set cells in bold, so both are ignored when checking; the header row is the document's
own (it may add units or notes), the rows under it must be the results file's. Only tables copied whole are
listed; the document's other tables select or rearrange rows of these files and say which file.

Links: every number in the text of a README link to a file of the repository (e.g. the summary table's
``[+0.0148 (p 6.4e-12)](results/.../equal_time.md)``) must appear, with its sign if it has one, in that file.

Index: every results folder has a row in ``results/README.md`` whose first cell links into it.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import List, Tuple

from study_lib import REPO_ROOT as ROOT

DOC = "docs/STUDY.md"
ACC = "results/Dataset004_Hippocampus/accuracy_cpu_12x50/accuracy.md"

# (results file, heading above the table in it, first header cells of the copy in DOC[, a line of DOC that
# starts the search, where two copies have the same header])
TABLES: List[tuple] = [
    (ACC, "## Against every stock run and their mean", "| method | mode | Dice | Δ vs stock 2026-11-30 14:35 UTC"),
    (ACC, "## Over all training runs", "| method | mode | runs | Dice of each run"),
    (ACC, "## Training dynamics", "| method | run | escape epoch | lowest class pseudo Dice"),
    ("results/Dataset004_Hippocampus/equal_time_cpu/equal_time.md", "# Methods across budgets",
     "| method | folder | budget | runs | Dice of each run | Dice of the run mean | training s",
     "From `results/Dataset004_Hippocampus/equal_time_cpu/equal_time.md`"),
    ("results/Dataset004_Hippocampus/equal_time_cpu_12x100/equal_time.md", "# Methods across budgets",
     "| method | folder | budget | runs | Dice of each run | Dice of the run mean | training s",
     "From `results/Dataset004_Hippocampus/equal_time_cpu_12x100/equal_time.md`"),
    ("results/Dataset004_Hippocampus/prediction_cpu_12x50_noisePassSum/prediction.md", "## Uncertainty",
     "| method | Dice | voxel AUROC | AUPRC | ECE | Brier | case-QC Spearman | worst-10% AUROC | expected Dice"),
    ("results/Dataset004_Hippocampus/table1_gpu_10x80/table1.md", "# table1",
     "| method | configuration | DS | NSD (1 mm)"),
    ("results/Dataset004_Hippocampus/benchmark_cpu_quick_noisePassSum/benchmark.md", "# DiffusionTrainer vs nnUNetTrainer",
     "| quantity | nnUNetTrainer | DiffusionTrainer | ratio |", "benchmark_cpu_quick_noisePassSum` (`benchmark.md`"),
    ("results/Dataset004_Hippocampus/benchmark_cpu_quick_noisePassSum/benchmark.md", "| quantity |",
     "| diffusion `--tta` | s / case | ratio to stock with mirroring |"),
    ("results/Dataset004_Hippocampus/benchmark_cpu_quick_paper/benchmark.md", "# DiffusionTrainer vs nnUNetTrainer",
     "| quantity | nnUNetTrainer | DiffusionTrainer | ratio |", "The paper's configuration, the default of then:"),
    ("results/Dataset004_Hippocampus/benchmark_cpu_quick_paper/benchmark.md", "| quantity |",
     "| diffusion `--tta` | s / case | ratio to stock with mirroring (2.65 s)"),
]

_MINUS = re.compile(r"(?<![\w.])-(?=\d)")


def _table_at(lines: List[str], start: int) -> Tuple[int, int]:
    """(first, end) line indices of the table that starts at or after ``start``."""
    first = next((i for i in range(start, len(lines)) if lines[i].startswith("|")), None)
    if first is None:
        raise ValueError("no table after line %d" % (start + 1))
    end = next((i for i in range(first, len(lines)) if not lines[i].startswith("|")), len(lines))
    return first, end


def source_table(path: str, heading: str) -> List[str]:
    """The first table after ``heading`` in ``path`` (a table row as heading: the table after that one)."""
    lines = open(os.path.join(ROOT, path), encoding="utf-8").read().split("\n")
    at = next((i for i, line in enumerate(lines) if line.startswith(heading)), None)
    if at is None:
        raise ValueError(f"{path}: no line starts with {heading!r}")
    if heading.startswith("|"):  # skip the table this row belongs to
        at = _table_at(lines, at)[1]
    first, end = _table_at(lines, at)
    return lines[first:end]


def copy_span(lines: List[str], header: str, anchor: str = None) -> Tuple[int, int]:
    """The table of DOC whose header starts with ``header``: the only one, or the first after the line that
    contains ``anchor``."""
    if anchor is not None:
        at = [i for i, line in enumerate(lines) if anchor in line]
        if len(at) != 1:
            raise ValueError(f"{DOC}: {len(at)} lines contain {anchor!r} (expected exactly one)")
        hit = next((i for i in range(at[0], len(lines)) if lines[i].startswith(header)), None)
        if hit is None:
            raise ValueError(f"{DOC}: no table starting with {header!r} after {anchor!r}")
        return _table_at(lines, hit)
    hits = [i for i, line in enumerate(lines) if line.startswith(header)]
    if len(hits) != 1:
        raise ValueError(f"{DOC}: {len(hits)} tables start with {header!r} (expected exactly one)")
    return _table_at(lines, hits[0])


def normalise(row: str) -> str:
    return row.replace("\u2212", "-").replace("**", "").rstrip()


def for_doc(row: str) -> str:
    return _MINUS.sub("\u2212", row)


def differences(doc: str) -> List[str]:
    """One message per copied table of DOC (its text: ``doc``) that differs from its results file (empty: all
    agree)."""
    lines, out = doc.split("\n"), []
    for path, heading, header, *anchor in TABLES:
        first, end = copy_span(lines, header, *anchor)
        # the rows under the header: the copy's header may add units or notes to the results file's
        copy = [normalise(r) for r in lines[first + 2:end]]
        source = [normalise(r) for r in source_table(path, heading)[2:]]
        if copy != source:
            extra = [r for r in copy if r not in source]
            missing = [r for r in source if r not in copy]
            msg = f"{DOC} line {first + 1} ({header.strip('| ')[:40]}...) differs from {path}"
            if extra:
                msg += "\n  only in the copy: " + extra[0] + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else "")
            if missing:
                msg += "\n  only in the results: " + missing[0] + (
                    f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
            if not extra and not missing:
                msg += "\n  same rows, another order"
            out.append(msg)
    return out


def regenerate(doc: str) -> str:
    lines = doc.split("\n")
    for path, heading, header, *anchor in TABLES:
        first, end = copy_span(lines, header, *anchor)
        lines[first + 2:end] = [for_doc(r) for r in source_table(path, heading)[2:]]
    return "\n".join(lines)


_LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")
_NUMBER = re.compile(r"[+\u2212-]?\d+(?:\.\d+)?(?:e[+\u2212-]?\d+)?")


def link_numbers(text: str) -> List[Tuple[str, str]]:
    """(number, target) for every number in the text of a markdown link to a relative path in ``text``; the
    number as written, its minus sign as "-"."""
    out = []
    for label, target in _LINK.findall(text):
        if "://" in target or target.startswith("#"):
            continue
        for number in _NUMBER.findall(label):
            out.append((number.replace("\u2212", "-"), target.split("#")[0]))
    return out


def link_differences(readme: str, base: str = ROOT) -> List[str]:
    """One message per number in a README link that its target file does not contain (empty: all found). A
    signed number must appear with its sign; an unsigned one with any sign or none."""
    out = []
    for number, target in link_numbers(readme):
        path = os.path.join(base, target)
        if not os.path.isfile(path):
            out.append(f"README.md: the link to {target} (number {number}) does not lead to a file")
            continue
        body = open(path, encoding="utf-8").read().replace("\u2212", "-")
        if not re.search(r"(?<![\d.])" + re.escape(number) + r"(?!\d)", body):
            out.append(f"README.md: {number} is not in {target}, the file its link names")
    return out


INDEX = "results/README.md"


def index_differences(index: str, results: str = os.path.join(ROOT, "results")) -> List[str]:
    """One message per results folder (``results/DATASET/FOLDER``, or ``results/FOLDER`` holding files only) that has
    no row in the index (text ``index``, a row being a table line whose first cell links into the folder), and per
    row whose link leads nowhere (empty: every folder has its row)."""
    rows = {}
    for line in index.split("\n"):
        if line.startswith("| ["):
            target = _LINK.search(line).group(2)
            rows[target.split("/")[0] if target.startswith("demo") else "/".join(target.split("/")[:2])] = target
    out = [f"{INDEX}: the row for {t} links to a missing file" for t in rows.values()
           if not os.path.exists(os.path.join(results, t))]
    for entry in sorted(os.listdir(results)):
        path = os.path.join(results, entry)
        if not os.path.isdir(path):
            continue
        subdirs = [d for d in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, d))]
        holds_runs = subdirs and not any(os.path.isfile(os.path.join(path, f)) for f in os.listdir(path))
        for folder in ([f"{entry}/{d}" for d in subdirs] if holds_runs else [entry]):
            if folder not in rows:
                out.append(f"{INDEX}: no row for the results folder {folder}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 if a copy differs")
    ap.add_argument("--doc", default=os.path.join(ROOT, DOC), help="the document holding the copied tables")
    ap.add_argument("--readme", default=os.path.join(ROOT, "README.md"), help="the README whose links are checked")
    args = ap.parse_args(argv)
    doc = open(args.doc, encoding="utf-8").read()
    if args.check:
        diffs = differences(doc)
        links = link_differences(open(args.readme, encoding="utf-8").read(), os.path.dirname(args.readme))
        index = index_differences(open(os.path.join(ROOT, INDEX), encoding="utf-8").read())
        for d in diffs + links + index:
            print(d)
        print(f"{len(TABLES) - len(diffs)} of {len(TABLES)} copied tables agree with their results files; "
              f"{len(links)} README link number(s) not found in their files; {len(index)} index problem(s)")
        return 1 if diffs or links or index else 0
    new = regenerate(doc)
    if new != doc:
        with open(args.doc, "w", encoding="utf-8") as f:
            f.write(new)
        print(f"rewrote {args.doc}")
    else:
        print(f"{args.doc} already agrees with the results files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
