"""Norms of the first convolution's weights per input channel (0: image, 1-3: the x_t mask channels) of the
default's three 12 x 50 training runs (checkpoint_final.pth, the weights nnU-Net validated)."""
import json, sys, torch
out = {}
for run, label in (("run1", "run 1 (08:53)"), ("run2", "run 2 (18:05, failed)"), ("run3", "run 3 (19:23)")):
    sd = torch.load(f"DiffusionTrainer_zeroInitChainMeanEma_12ep50it__nnUNetPlans__3d_fullres.{run}/fold_0/"
                    "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    w = sd["unet.encoder.stages.0.0.convs.0.conv.weight"]
    out[label] = {"image": round(w[:, 0].norm().item(), 3),
                  "x_t channels": [round(w[:, c].norm().item(), 3) for c in range(1, w.shape[1])]}
json.dump(out, sys.stdout, indent=1)
