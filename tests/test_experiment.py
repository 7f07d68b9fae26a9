"""The experiment runner on the tiny synthetic dataset: table1 trains four runs (two at a time), writes the
comparison reports and timings, and a second call skips every finished run. The time-boxed benchmark's
calibration reads those real logs."""
import importlib.util
import json
import os

import pytest

from conftest import BIN, DATASET, run

HERE = os.path.dirname(os.path.abspath(__file__))


def _timeboxed():
    path = os.path.join(HERE, "..", "benchmarks", "timeboxed_experiment.py")
    spec = importlib.util.spec_from_file_location("timeboxed_experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~2 min on 2 cores; the runner's resume, progress and table logic have faster tests here
def test_table1_runs_compares_and_resumes(env, tmp_path):
    out = tmp_path / "t1"
    cmd = [f"{BIN}/nnunet-diffusion", "experiment", "table1", "-d", "990", "--budget", "1x2", "-device", "cpu",
           "-o", str(out)]
    proc = run(cmd + ["--jobs", "2"], env=env)
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

    timings = json.load(open(out / "timings.json"))
    assert len(timings["runs"]) == 4 and all(v > 0 for v in timings["runs"].values())
    assert timings["reports_s"] > 0 and timings["training_s"] >= max(timings["runs"].values())

    runs = _timeboxed().calibrate(str(out), "1x2")
    assert set(runs) == set(timings["runs"])
    for r in runs.values():
        assert len(r["epoch_s"]) == 1 and 0 < r["s_per_iteration"] < r["wall_s"] and r["fixed_s"] >= 0

    again = run(cmd, env=env)
    assert again.stdout.count("finished earlier, skipped") == 4


def test_timeboxed_budget_arithmetic():
    tb = _timeboxed()
    runs = {"a": {"fixed_s": 30.0, "s_per_iteration": 0.1}, "b": {"fixed_s": 60.0, "s_per_iteration": 0.5}}
    # slowest run: 60 s fixed + 10 epochs * (I + I//5) * 0.5 s <= 0.5 * 1000 s: 74 + 14 = 88 fits, 75 + 15 not
    assert tb.choose_iterations(runs, 1000, 10, 0.5, waves=1) == 74
    # two waves share the time: 250 - 60 = 190 s -> I + I//5 <= 38: 32 + 6 fits, 33 + 6 not
    assert tb.choose_iterations(runs, 1000, 10, 0.5, waves=2) == 32
    # tiny budgets count the one validation iteration: 60 + 10 * (2 + 1) * 0.5 = 75 s fits, I = 3 needs 80 s
    assert tb.choose_iterations(runs, 150, 10, 0.5, waves=1) == 2
    assert tb.choose_iterations(runs, 100, 10, 0.5, waves=1) == 0


@pytest.mark.parametrize("jobs", ["0", "x"])
def test_experiment_rejects_bad_jobs(jobs, env):
    proc = run([f"{BIN}/nnunet-diffusion", "experiment", "table1", "-d", "990", "--jobs", jobs], env=env, check=False)
    assert proc.returncode != 0 and "--jobs must be an integer" in proc.stderr


def test_training_env_keeps_the_callers_values(monkeypatch):
    import nnunet_diffusion.options as cli  # where training_env looks trainers_path up
    from nnunet_diffusion.experiment import training_env

    def boom():
        raise AssertionError("trainers_path must not be called when nnUNet_extTrainer is set")

    monkeypatch.setattr(cli, "trainers_path", boom)
    env = training_env({"nnUNet_extTrainer": "/checkout/trainers", "nnUNet_n_proc_DA": "3"}, "cuda")
    assert env == {"nnUNet_extTrainer": "/checkout/trainers", "nnUNet_n_proc_DA": "3", "nnUNet_compile": "t"}
    monkeypatch.setattr(cli, "trainers_path", lambda: "/installed/trainers")
    env = training_env({}, "cpu")
    assert env == {"nnUNet_extTrainer": "/installed/trainers", "nnUNet_n_proc_DA": "0", "nnUNet_compile": "f"}


@pytest.mark.parametrize("command", [["experiment", "table1"], ["benchmark", "--quick"]])
def test_plans_that_do_not_exist_are_refused(env, tmp_path, command):
    """-p names the plans (e.g. a residual-encoder preset); plans that were never made fail clearly and write
    nothing."""
    out = tmp_path / "o"
    proc = run([f"{BIN}/nnunet-diffusion", *command, "-d", "990", "-p", "nnUNetResEncUNetMPlans", "-device", "cpu",
                "-o", str(out)], env=env, check=False)
    assert proc.returncode == 1
    assert "has no plans 'nnUNetResEncUNetMPlans'" in proc.stderr
    assert not out.exists()
