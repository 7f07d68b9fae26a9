"""A reduced benchmark on the tiny synthetic dataset: every key is written and every number is positive.
(The speed targets are not asserted in tests; the benchmark prints them.)"""
import json

import pytest

from conftest import BIN, run


@pytest.mark.slow  # ~1.5 min on 2 cores (trains both trainers briefly, times every mode)
def test_quick_benchmark_writes_every_key(env, tmp_path):
    out = tmp_path / "bench"
    run([f"{BIN}/nnunet-diffusion", "benchmark", "-d", "990", "-c", "3d_fullres", "--quick", "--repeats", "2",
         "-device", "cpu", "-o", str(out)], env=env)
    r = json.load(open(out / "benchmark.json"))
    for key in ("train_iter_ratio", "peak_mem_ratio", "predict_ratio", "dice_diffusion", "dice_stock", "medians",
                "machine", "torch_version", "raw", "data_load_s"):
        assert key in r, key
    assert r["train_iter_ratio"] > 0
    assert r["peak_mem_ratio"] is None or r["peak_mem_ratio"] > 0
    modes = {"full", "final", "chain", "off"}
    assert set(r["predict_ratio"]) == modes and set(r["predict_ratio_notta"]) == modes
    assert all(v > 0 for v in [*r["predict_ratio"].values(), *r["predict_ratio_notta"].values()])
    m = r["medians"]["predict_case_s"]
    for mode in modes:  # each ratio is that mode's time over the stated stock time
        assert abs(r["predict_ratio"][mode] - m[mode] / m["stock"]) < 1e-9
        assert abs(r["predict_ratio_notta"][mode] - m[mode] / m["stock_notta"]) < 1e-9
    assert r["machine"]["cpu"] and r["machine"]["nnunetv2"]
    for k in ("stock", "diffusion"):
        assert r["medians"]["train_iter_s"][k] > 0 and len(r["raw"]["train_iter_s"][k]) == 2
    assert all(v > 0 for v in r["medians"]["predict_case_s"].values())
    assert r["dice_diffusion"] is None and r["dice_stock"] is None  # --quick skips the training
    # the timed settings are recorded: the default's, which differ from the paper's and change between releases
    from nnunet_diffusion.trainer import DiffusionTrainer
    assert r["diffusion_trainer"] == "DiffusionTrainer"
    assert r["diffusion_config"] == DiffusionTrainer.diffusion.to_dict()
    md = open(out / "benchmark.md").read()
    # the markdown is generated from the JSON: every mode's row carries its measured time and both ratios
    for mode in modes:
        row = f"| {mode} | {m[mode]:.2f} | {r['predict_ratio'][mode]:.2f} | {r['predict_ratio_notta'][mode]:.2f} |"
        assert row in md
    assert f"| train iteration (s) | {r['medians']['train_iter_s']['stock']:.3f} |" in md
    assert "supervise_recycle = True" in md and "recycle_loss = sum" in md
