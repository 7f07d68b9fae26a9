"""The paper's exact configuration and its Table-2 ablations (``-tr DiffusionTrainer_<change>``)."""
from nnunet_diffusion.variants import *  # noqa: F401,F403
from nnunet_diffusion.variants import __all__  # noqa: F401
