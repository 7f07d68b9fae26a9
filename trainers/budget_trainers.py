"""Short-budget trainers ``<Trainer>_<E>ep<I>it`` (e.g. ``-tr DiffusionTrainer_2ep5it``)."""
from nnunet_diffusion.budget import make_budget_trainer


def __getattr__(name: str) -> type:
    if name.startswith("__"):
        raise AttributeError(name)
    return make_budget_trainer(name)
