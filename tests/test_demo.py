"""The demo's short run: the shipped DiffusionTrainer with only a budget, trained at nnU-Net's initial learning rate
throughout (the 4 x 15 default decayed it before the network learnt the foreground: Dice 0.000), a verdict that
says whether the model learnt, and clear refusals of bad options. The whole demo is measured in
results/demo_cpu/ (it takes minutes, so it is not a test)."""
import pytest
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnunet_diffusion import demo
from nnunet_diffusion.budget import make_budget_trainer
from nnunet_diffusion.trainer import DiffusionTrainer


def test_demo_trains_the_shipped_trainer_with_only_a_budget():
    cls = make_budget_trainer(demo.short_run_trainer(demo.DEMO_EPOCHS, demo.DEMO_ITERS))
    assert cls.__mro__[1] is DiffusionTrainer
    assert set(vars(cls)) - {"__module__", "__qualname__", "__doc__"} == {"__init__"}


def test_demo_short_run_keeps_nnunets_initial_learning_rate():
    """nnU-Net's poly schedule is set at each epoch's start; over the demo's epochs it must not decay."""
    initial = 1e-2
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=initial, momentum=0.99, nesterov=True)
    sched = PolyLRScheduler(opt, initial, demo.DEMO_EPOCHS)
    rates = []
    for epoch in range(demo.DEMO_EPOCHS):
        sched.step(epoch)
        rates.append(opt.param_groups[0]["lr"])
    assert rates == [initial] * demo.DEMO_EPOCHS


def test_demo_verdict_says_whether_the_model_learnt():
    learnt, text = demo.verdict(0.62, "DiffusionTrainer_1ep120it", 1, 120, 2, 24)
    assert learnt and "LEARNT" in text and "0.620" in text
    learnt, text = demo.verdict(0.0, "DiffusionTrainer_4ep15it", 4, 15, 2, 24)
    assert not learnt and "did NOT learn" in text and "--iters 120" in text
    assert demo.verdict(demo.LEARNT_DICE, "T_1ep1it", 1, 1, 1, 1)[0]


@pytest.mark.parametrize("args, message", [(["--seed", "-1"], "--seed must be >= 0"),
                                           (["--iters", "0"], "must be >= 1"),
                                           (["--data", "/nonexistent"], "no dataset.json")])
def test_demo_refuses_bad_options(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        demo.main(args + ["--out", str(tmp_path / "demo_output")])
    assert message in capsys.readouterr().err
