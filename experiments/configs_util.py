"""Load a configs/*.py file by path (for scripts that build configs in Python rather than from flags)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections


def load_config(path) -> ml_collections.ConfigDict:
    """`get_config()` of the config file at `path`, unlocked for direct edits (`config.key = value`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} not found")
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} has no get_config()")
    return module.get_config()
