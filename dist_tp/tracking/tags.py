"""What a run is, for filtering and comparing: its params (the flattened resolved config) and
tags (dataset, backbone, method, engine, loss, seed, world size, device, code version)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from dist_tp.config import flatten, to_dict


def run_params(cfg) -> dict[str, Any]:
    return flatten(to_dict(cfg))


def dataset_name(data_path: str, meta: dict) -> str:
    """The dataset's registry name from its ``meta.json``, else the prepared folder's name."""
    return meta.get("dataset") or Path(str(data_path).rstrip("/")).name


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the code that runs (None outside a git checkout)."""
    path = path or Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def run_tags(cfg, meta: dict, world_size: int) -> dict[str, str]:
    """What a run is, for filtering and comparing: dataset (name and fingerprint), backbone,
    method, engine, loss, seed, world size, device, code version."""
    source = meta.get("source", {})
    tags = {
        "dataset": dataset_name(cfg.data.path, meta),
        "dataset.sha256": source.get("sha256", ""),
        "backbone": cfg.model.name,
        "method": cfg.train.method,
        "engine": cfg.train.engine,
        "loss": cfg.train.loss,
        "seed": str(cfg.train.seed),
        "world_size": str(world_size),
        "device": device_name(cfg.train.device),
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def device_name(spec: str) -> str:
    """``cpu``, or the GPU's model (``cuda:0 NVIDIA H100 80GB HBM3``): timings differ by it."""
    from dist_tp.core.device import resolve_device

    device = resolve_device(spec)
    if device.type != "cuda":
        return "cpu"
    import torch

    return f"{device} {torch.cuda.get_device_name(device)}"
