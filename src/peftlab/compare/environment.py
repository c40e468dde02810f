"""What ``results.json`` records about where and how a comparison ran: versions, hardware, the command."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any


def environment(command: str | None, resolved: str, settings: dict[str, Any]) -> dict[str, Any]:
    import datetime
    import importlib.metadata
    import platform

    import torch

    from peftlab import __version__, hardware

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    device = hardware.device_type()
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "peft": version("peft"),
        "bitsandbytes": version("bitsandbytes"),
        "peftlab": __version__,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "threads": torch.get_num_threads(),
        "worker_threads": threads_text(settings.get("worker_threads")),
        "cpu_cores": hardware.cpu_count(),
        "cpu": cpu_name(),
        "bf16_native": hardware.bf16_supported(),
        "precision": settings.get("precision"),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command or resolved,
        "resolved_command": resolved,
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except (ImportError, OSError):  # pragma: no cover
        pass
    return info


def threads_text(choice: dict[str, Any] | None) -> str | None:
    if not choice:
        return None
    return f"{choice['threads'] or 'default'}: {choice['why']}"


def cpu_name() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def invocation() -> str | None:
    """The command line as typed, when compare was started from the ``peftlab`` command."""
    argv = sys.argv
    if argv and Path(argv[0]).name in ("peftlab", "cli.py", "__main__.py") and "compare" in argv[1:]:
        return "peftlab " + shlex.join(argv[1:])
    return None


def resolved_command(names, out: Path, repeats: int, options: dict[str, Any], per_method: dict,
                     extra: dict[str, Any] | None = None) -> str:
    """A ``peftlab compare`` command with every option this comparison used spelled out. ``extra``: compare's
    own flags besides these (``tasks``, ``suite``, ``tune``, ``trials``, ``workers``, ``ray``), None when unused."""
    parts = ["peftlab", "compare", "--methods", ",".join(names), "--output", str(out)]
    if repeats != 1:
        parts += ["--repeats", str(repeats)]
    for key, value in (extra or {}).items():
        if value is True:
            parts.append("--" + key)
        elif value not in (None, False):
            parts += ["--" + key, str(value)]
    for key, value in sorted(options.items()):
        if isinstance(value, dict):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            parts += [flag, ",".join(map(str, value))]
        else:
            parts += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    command = shlex.join(parts)
    if per_method:
        command += "  # plus per-method options from the recipe: " + "; ".join(
            f"{name}: {', '.join(f'{k}={v}' for k, v in values.items())}" for name, values in per_method.items())
    return command


__all__ = ["environment", "threads_text", "cpu_name", "invocation", "resolved_command"]
