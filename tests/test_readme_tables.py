"""The study document's copies of result tables are the committed results files' tables, and every number in a
README link is in the file it links to (benchmarks/readme_tables.py)."""
import os

import readme_tables

DOC = os.path.join(readme_tables.ROOT, readme_tables.DOC)
README = os.path.join(readme_tables.ROOT, "README.md")


def test_copied_tables_agree_with_their_results_files():
    assert readme_tables.differences(open(DOC, encoding="utf-8").read()) == []


def test_an_edited_cell_or_a_dropped_row_is_caught_and_regenerated():
    doc = open(DOC, encoding="utf-8").read()
    rows = readme_tables.source_table(*readme_tables.TABLES[1][:2])[2:]
    row = readme_tables.for_doc(rows[-1])
    assert row in doc
    cells = row.split(" | ")
    cells[-2] = "0.9999"  # a number typed by hand
    edited = doc.replace(row, " | ".join(cells))
    diffs = readme_tables.differences(edited)
    assert len(diffs) == 1 and "0.9999" in diffs[0] and readme_tables.TABLES[1][0] in diffs[0]
    dropped = doc.replace(row + "\n", "")
    diffs = readme_tables.differences(dropped)
    assert len(diffs) == 1 and "only in the results" in diffs[0]
    assert readme_tables.differences(readme_tables.regenerate(edited)) == []
    assert readme_tables.regenerate(dropped) == readme_tables.regenerate(doc)


def test_minus_signs_and_bold_are_not_differences_but_dates_keep_their_hyphens():
    assert readme_tables.for_doc("| x | -0.0037 (1e-05) | 2026-12-1 00:08 |") == \
        "| x | \u22120.0037 (1e-05) | 2026-12-1 00:08 |"
    assert readme_tables.normalise("| **\u22120.5** |") == "| -0.5 |"


def test_every_number_in_a_readme_link_is_in_the_linked_file():
    readme = open(README, encoding="utf-8").read()
    numbers = readme_tables.link_numbers(readme)
    # the summary table links its numbers: at least the equal-iteration and equal-time cells
    assert ("+0.0148", "results/Dataset004_Hippocampus/equal_time_cpu/equal_time.md") in numbers
    assert ("-0.0013", "results/Dataset004_Hippocampus/equal_time_cpu/equal_time.md") in numbers
    assert readme_tables.link_differences(readme) == []


def test_a_changed_sign_or_digit_in_a_readme_link_is_caught(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "r.md").write_text("| a | -0.0013 (0.54) | 2.01 |\n", encoding="utf-8")
    base = "[\u22120.0013 (p 0.54)](results/r.md) and [2.01\u00d7](results/r.md)"
    assert readme_tables.link_differences(base, str(tmp_path)) == []
    for wrong, number in (("[+0.0013 (p 0.54)](results/r.md)", "+0.0013"), ("[0.0014 (p 0.54)](results/r.md)",
                                                                             "0.0014"),
                          ("[2.0 stock](results/r.md)", "2.0"), ("[0.54](results/missing.md)", "0.54")):
        diffs = readme_tables.link_differences(base + " " + wrong, str(tmp_path))
        assert len(diffs) == 1 and number in diffs[0], (wrong, diffs)
    # links to web pages and anchors are not results
    assert readme_tables.link_differences("[nnU-Net v2](https://x.org/2) [k=5](#k-5)", str(tmp_path)) == []


def test_every_results_folder_has_a_row_in_the_index():
    index = open(os.path.join(readme_tables.ROOT, readme_tables.INDEX), encoding="utf-8").read()
    assert readme_tables.index_differences(index) == []


def test_a_folder_without_a_row_or_a_row_without_its_folder_is_caught(tmp_path):
    results = tmp_path / "results"
    for folder in ("D/a_run", "D/b_run", "demo"):
        (results / folder).mkdir(parents=True)
        (results / folder / "x.md").write_text("x")
    (results / "README.md").write_text("index")  # a file beside the folders is not a folder
    rows = "| [`a_run`](D/a_run/x.md) | q |\n| [`demo`](demo/x.md) | q |\n"
    assert readme_tables.index_differences(rows, str(results)) == ["results/README.md: no row for the results "
                                                                   "folder D/b_run"]
    rows += "| [`b_run`](D/b_run/x.md) | q |\n| [`gone`](D/gone/x.md) | q |\n"
    diffs = readme_tables.index_differences(rows, str(results))
    assert diffs == ["results/README.md: the row for D/gone/x.md links to a missing file"]
