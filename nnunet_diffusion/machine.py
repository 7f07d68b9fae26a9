"""What a measurement ran on: written into every results file next to its numbers."""
from __future__ import annotations

import datetime
import os
import platform
from typing import Dict, Optional


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: Optional[str] = None) -> Dict:
    """CPU model, cores, GPU name (if CUDA is in use), torch and nnU-Net versions, UTC date."""
    import torch
    from importlib.metadata import PackageNotFoundError, version
    try:
        nnunet_version = version("nnunetv2")
    except PackageNotFoundError:
        nnunet_version = None
    gpu = torch.cuda.get_device_name(0) if (device or "").startswith("cuda") and torch.cuda.is_available() else None
    return {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "gpu": gpu, "torch": torch.__version__, "nnunetv2": nnunet_version, "python": platform.python_version(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")}


def describe(device: str, m: Dict) -> str:
    """One line for a report: device, CPU, cores, GPU, versions, date."""
    return (f"device {device} ({m['cpu']}, {m['cpu_count']} cores{', ' + m['gpu'] if m.get('gpu') else ''}); "
            f"torch {m['torch']}, nnunetv2 {m['nnunetv2']}; {m['date_utc']} UTC")
