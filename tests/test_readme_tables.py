"""The README's copies of result tables are the committed results files' tables (benchmarks/readme_tables.py)."""
import os
import sys

import readme_tables

README = os.path.join(readme_tables.ROOT, "README.md")


def test_readme_tables_agree_with_their_results_files():
    assert readme_tables.differences(open(README, encoding="utf-8").read()) == []


def test_an_edited_cell_or_a_dropped_row_is_caught_and_regenerated():
    readme = open(README, encoding="utf-8").read()
    rows = readme_tables.source_table(*readme_tables.TABLES[1][:2])[2:]
    row = readme_tables.for_readme(rows[-1])
    assert row in readme
    cells = row.split(" | ")
    cells[-2] = "0.9999"  # a number typed by hand
    edited = readme.replace(row, " | ".join(cells))
    diffs = readme_tables.differences(edited)
    assert len(diffs) == 1 and "0.9999" in diffs[0] and readme_tables.TABLES[1][0] in diffs[0]
    dropped = readme.replace(row + "\n", "")
    diffs = readme_tables.differences(dropped)
    assert len(diffs) == 1 and "only in the results" in diffs[0]
    assert readme_tables.differences(readme_tables.regenerate(edited)) == []
    assert readme_tables.regenerate(dropped) == readme_tables.regenerate(readme)


def test_minus_signs_and_bold_are_not_differences_but_dates_keep_their_hyphens():
    assert readme_tables.for_readme("| x | -0.0037 (1e-05) | 2026-12-1 00:08 |") == \
        "| x | \u22120.0037 (1e-05) | 2026-12-1 00:08 |"
    assert readme_tables.normalise("| **\u22120.5** |") == "| -0.5 |"
