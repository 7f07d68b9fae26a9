"""Short-budget trainers on demand: ``<Trainer>_<E>ep<I>it``.

``DiffusionTrainer_2ep5it`` is ``DiffusionTrainer`` with 2 epochs of 5 training
iterations (and max(1, I // 5) validation iterations, nnU-Net's 250:50 ratio);
checkpoint_latest is saved every max(1, E // 5) epochs instead of every 50.
Any trainer works as base: ``nnUNetTrainer_10ep50it`` gives stock nnU-Net the same
budget, which is what a fair comparison needs. Classes are created when first
asked for (module ``__getattr__``) and cached, so pickling them by name works.
"""
from __future__ import annotations

import re
from typing import Dict, Type

import torch

_PATTERN = re.compile(r"^(?P<base>[A-Za-z_][A-Za-z0-9_]*?)_(?P<epochs>[1-9][0-9]*)ep(?P<iters>[1-9][0-9]*)it$")
_CACHE: Dict[str, type] = {}


def budget_name(base: str, epochs: int, iterations: int) -> str:
    """The class name giving trainer ``base`` a budget of ``epochs`` x ``iterations``."""
    if epochs < 1 or iterations < 1:
        raise ValueError(f"a budget needs at least 1 epoch and 1 iteration, got {epochs}x{iterations}")
    return f"{base}_{epochs}ep{iterations}it"


def parse_budget(text: str) -> tuple[int, int]:
    """'EPOCHSxITERS' -> (epochs, iterations)."""
    m = re.fullmatch(r"\s*([1-9][0-9]*)\s*[xX]\s*([1-9][0-9]*)\s*", text)
    if not m:
        raise ValueError(f"budget must look like EPOCHSxITERS with positive integers, e.g. 10x50; got {text!r}")
    return int(m.group(1)), int(m.group(2))


def validation_iterations(iterations: int) -> int:
    """Validation iterations per epoch of a budget trainer: nnU-Net's 250:50 ratio, at least 1."""
    return max(1, iterations // 5)


def _find_base(name: str) -> type:
    from nnunet_diffusion.variants import find_trainer
    try:
        return find_trainer(name)
    except AttributeError:
        pass
    import nnunetv2
    from os.path import join
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    found = recursive_find_python_class(join(nnunetv2.__path__[0], "training", "nnUNetTrainer"), name,
                                        "nnunetv2.training.nnUNetTrainer")
    if found is None:
        raise AttributeError(f"no trainer named {name!r} to give a budget to")
    return found


def make_budget_trainer(name: str) -> type:
    """The class for a budget name such as ``DiffusionTrainer_2ep5it``."""
    if name in _CACHE:
        return _CACHE[name]
    m = _PATTERN.match(name)
    if m is None:
        raise AttributeError(name)
    base: Type = _find_base(m.group("base"))
    epochs, iters = int(m.group("epochs")), int(m.group("iters"))

    # nnU-Net records its __init__ arguments by signature, so keep nnUNetTrainer's exactly
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = epochs
        self.num_iterations_per_epoch = iters
        self.num_val_iterations_per_epoch = validation_iterations(iters)
        # nnU-Net saves checkpoint_latest every 50 epochs; a short run saves 5 times (at least every epoch)
        self.save_every = max(1, min(self.save_every, epochs // 5))

    cls = type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name,
                               "__doc__": f"{base.__name__} with {epochs} epochs x {iters} iterations."})
    _CACHE[name] = cls
    return cls


def __getattr__(name: str) -> type:
    if name.startswith("__"):
        raise AttributeError(name)
    return make_budget_trainer(name)
