"""The experiment runner on the tiny synthetic dataset: table1 trains four runs, writes the comparison
reports, and a second call skips every finished run."""
import json
import os

from conftest import BIN, DATASET, run


def test_table1_runs_compares_and_resumes(env, tmp_path):
    out = tmp_path / "t1"
    cmd = [f"{BIN}/nnunet-diffusion", "experiment", "table1", "-d", "990", "--budget", "1x2", "-device", "cpu",
           "-o", str(out)]
    proc = run(cmd, env=env)
    for cfg in ("2d", "3d_fullres"):
        for tr in ("nnUNetTrainer_1ep2it", "DiffusionTrainer_1ep2it"):
            fold = os.path.join(env["nnUNet_results"], DATASET, f"{tr}__nnUNetPlans__{cfg}", "fold_0")
            assert os.path.isfile(os.path.join(fold, "validation", "summary.json"))
        rep = out / f"DiffusionTrainer_vs_nnUNetTrainer_{cfg}"
        for f in ("report.md", "report.json", "per_class_dice.png"):
            assert (rep / f).is_file()
        assert json.load(open(rep / "report.json"))["num_cases"] >= 2
    assert "[run 4/4]" in proc.stdout and "epoch 1/1" in proc.stdout
    table = (out / "table1.md").read_text()
    assert "| DiffusionTrainer | 3d_fullres |" in table and "| nnUNetTrainer | 2d |" in table

    again = run(cmd, env=env)
    assert again.stdout.count("finished earlier, skipped") == 4
