"""DiffusionTrainer.train_step under DistributedDataParallel (gloo, 2 CPU processes).

nnU-Net's DDP set-up needs one GPU per rank (it moves the trainer to cuda:local_rank), so each process builds
a DiffusionTrainer holding only what a step reads (network wrapped in DDP, optimizer, nnU-Net's deep-supervised
Dice + CE with ddp=True, label manager) and calls the real ``train_step``. Both ranks see different data; after
the steps their parameters must be identical. In one step rank 1's loss is NaN: both ranks must skip that
update together (a skip on one rank alone leaves the other waiting in the gradient all-reduce).
"""
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))

NAN_STEP = 1  # rank 1 gets a NaN voxel in this step (0-based) of 3


def _trainer(trainer_class, rank):
    from conftest import tiny_diffusion_net
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = tiny_diffusion_net(3, deep_supervision=True, config=trainer_class.diffusion)  # same seed on both ranks
    torch.nn.init.normal_(net.denoiser.time_proj.weight, std=0.05)
    tr = object.__new__(trainer_class)
    tr.network, tr.is_ddp, tr.local_rank, tr.device = DDP(net), True, rank, torch.device("cpu")
    tr.grad_scaler, tr.current_epoch = None, 0
    tr.optimizer = torch.optim.SGD(tr.network.parameters(), lr=0.05, momentum=0.9)
    tr.loss = DeepSupervisionWrapper(
        DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": True}, {},
                       weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss), [0.57, 0.29, 0.14])
    tr.label_manager = SimpleNamespace(num_segmentation_heads=3)
    tr.log = []
    tr.print_to_log_file = lambda *a, **k: tr.log.append(" ".join(str(x) for x in a))
    return tr, net


def _worker(rank, world, init_file, out_dir, trainer_name):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from nnunet_diffusion import variants
    tr, net = _trainer(variants.TRAINERS[trainer_name], rank)
    g = torch.Generator().manual_seed(100 + rank)  # different data per rank
    torch.manual_seed(200 + rank)  # and different noise
    losses = []
    for step in range(3):
        image = torch.randn(2, 1, 8, 8, 8, generator=g)
        if rank == 1 and step == NAN_STEP:
            image[0, 0, 0, 0, 0] = float("nan")
        label = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=g).float()
        out = tr.train_step({"data": image, "target": [label, label[:, :, ::2, ::2, ::2], label[:, :, ::4, ::4, ::4]]})
        losses.append(float(out["loss"]))
        assert net.decoder.deep_supervision  # restored after the recycle pass
    flat = torch.cat([p.detach().flatten() for p in net.parameters()]).numpy()
    np.save(os.path.join(out_dir, f"rank{rank}.npy"), flat)
    np.save(os.path.join(out_dir, f"rank{rank}_info.npy"), np.array([tr.skipped_updates, *losses]))
    dist.destroy_process_group()


@pytest.mark.parametrize("trainer_name", ["DiffusionTrainer_paper", "DiffusionTrainer"])
def test_ddp_ranks_skip_together_and_stay_identical(tmp_path, trainer_name):
    init = tmp_path / "init"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, 2, str(init), str(tmp_path), trainer_name)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(150)
            assert p.exitcode == 0, f"rank exited with {p.exitcode} (None: hung in a collective)"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    a, b = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    info0, info1 = np.load(tmp_path / "rank0_info.npy"), np.load(tmp_path / "rank1_info.npy")
    assert info0[0] == info1[0] == 1  # both ranks skipped exactly the one update
    assert np.isnan(info1[1 + NAN_STEP]) and np.isfinite(info0[1 + NAN_STEP])
    assert np.isfinite(a).all() and np.array_equal(a, b)
    # and training moved the parameters (the ranks did not just both stay at the initial values)
    from conftest import tiny_diffusion_net
    from nnunet_diffusion import variants
    net = tiny_diffusion_net(3, deep_supervision=True, config=variants.TRAINERS[trainer_name].diffusion)
    torch.nn.init.normal_(net.denoiser.time_proj.weight, std=0.05)
    init_params = torch.cat([p.detach().flatten() for p in net.parameters()]).numpy()
    assert not np.allclose(a, init_params)
