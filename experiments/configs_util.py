"""Load a configs/*.py file by path and apply `key=value` overrides with clear errors."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import ml_collections


def load_config(path) -> ml_collections.ConfigDict:
    """`get_config()` of the config file at `path`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} not found")
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} has no get_config()")
    return module.get_config()


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
    """Apply ["key=value", …]; values are Python literals (strings may be bare)."""
    config = ml_collections.ConfigDict(config.to_dict())
    for item in overrides or ():
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        key = key.removeprefix("config.")
        if key not in config:
            raise ValueError(f"unknown config key {key!r}; known keys: {sorted(config.keys())}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        try:
            setattr(config, key, value)
        except TypeError as err:
            raise ValueError(f"bad value for {key}: {raw!r} ({err})") from None
    return config
