"""nnU-Net must find the trainers through nnUNet_extTrainer, from a clean process."""
import os
import subprocess
import sys

import pytest

from nnunet_diffusion.cli import trainers_path
from nnunet_diffusion.variants import TRAINERS

FIND = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f\n"
        "import sys\n"
        "c = f(sys.argv[1])\n"
        "print('FOUND', c.__module__, c.__name__, c.__mro__[1].__name__)\n")


def _start(name, ext):
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    if ext is not None:
        env["nnUNet_extTrainer"] = ext
    return subprocess.Popen([sys.executable, "-c", FIND, name], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=os.path.expanduser("~"))


def _expected(name):
    from nnunet_diffusion.variants import find_trainer
    cls = find_trainer(name)
    return name, cls.__module__, cls.__mro__[1].__name__


# every shipped trainer (the one registry, variants.TRAINERS), a former default made from the table, budget twins
CLEAN_LOOKUPS = [_expected(name) for name in TRAINERS] + [
    ("DiffusionTrainer_zeroInitChainMeanEma", "nnunet_diffusion.trainers.former_defaults", "FormerDefaultTrainer"),
    ("DiffusionTrainer_3ep7it", "nnunet_diffusion.budget", "DiffusionTrainer"),
    ("DiffusionTrainer_zeroInitChainMean_3ep7it", "nnunet_diffusion.budget", "DiffusionTrainer_zeroInitChainMean"),
    ("nnUNetTrainer_3ep7it", "nnunet_diffusion.budget", "nnUNetTrainer"),
]


@pytest.fixture(scope="module")
def lookups():
    """Every lookup of this file, each in its own clean process, all started at once (their interpreter start-ups
    overlap instead of running one after another): {name or None (no nnUNet_extTrainer): (returncode, stdout,
    stderr)}."""
    procs = {name: _start(name, trainers_path()) for name, _, _ in CLEAN_LOOKUPS}
    procs[None] = _start("DiffusionTrainer", None)
    results = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=600)
        results[name] = (p.returncode, stdout, stderr)
    return results


def test_trainers_path_is_a_folder_of_thin_trainer_modules():
    """nnU-Net imports every module below nnUNet_extTrainer, recursively: the folder must hold trainer modules
    and nothing else (pointing it at site-packages or at the package itself would import everything)."""
    path = trainers_path()
    assert os.path.isdir(path)
    entries = set(os.listdir(path)) - {"__pycache__", "__init__.py"}
    modules = sorted(f for f in entries if f.endswith(".py"))
    assert entries == set(modules), f"not a trainer module: {sorted(entries - set(modules))}"
    assert "DiffusionTrainer.py" in modules
    for m in modules:  # thin: no module defines training logic itself
        assert len(open(os.path.join(path, m)).read().splitlines()) < 20, m


def test_cli_prints_the_path():
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "nnunet-diffusion"), "trainers-path"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == trainers_path()


@pytest.mark.parametrize("name,module,parent", CLEAN_LOOKUPS)
def test_discovery_from_clean_process(lookups, name, module, parent):
    returncode, stdout, stderr = lookups[name]
    assert returncode == 0, stderr[-3000:]
    assert f"FOUND {module} {name} {parent}" in stdout


def test_missing_variable_fails(lookups):
    returncode, stdout, stderr = lookups[None]
    assert returncode != 0
    assert "Could not find requested nnunet trainer DiffusionTrainer" in stderr


def test_budget_trainer_settings():
    from nnunet_diffusion.budget import make_budget_trainer, parse_budget
    cls = make_budget_trainer("DiffusionTrainer_noRecycle_4ep10it")
    assert cls.__name__ == "DiffusionTrainer_noRecycle_4ep10it"
    assert cls.diffusion.recycle is False
    assert make_budget_trainer("DiffusionTrainer_noRecycle_4ep10it") is cls
    assert parse_budget("5x20") == (5, 20)
    for bad in ("5", "0x3", "ax3", "3x-1"):
        with pytest.raises(ValueError):
            parse_budget(bad)
    with pytest.raises(AttributeError):
        make_budget_trainer("DiffusionTrainer_0ep3it")


def test_trainer_modules_export_exactly_the_registry():
    """The thin modules nnU-Net imports export the registry's trainers (variants.TRAINERS), no more, no fewer:
    a trainer added to the package is added there, once."""
    import importlib
    exported = set()
    for f in sorted(os.listdir(trainers_path())):
        if f.endswith(".py") and f != "__init__.py":
            exported |= set(getattr(importlib.import_module(f"nnunet_diffusion.trainers.{f[:-3]}"), "__all__", ()))
    assert exported == set(TRAINERS)
