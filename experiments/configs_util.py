"""Load a configs/*.py file by path (for scripts that build configs in Python rather than from flags)."""

from __future__ import annotations

import difflib
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


def did_you_mean(key: str, known) -> str:
    """" (did you mean 'a' or 'b'?)" naming up to three of the `known` keys spelled like `key` or containing it
    (shortest first); "" when none is."""
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    if len(key) >= 3:
        close += sorted((k for k in known if key in k and k not in close), key=len)[:3 - len(close)]
    return f" (did you mean {' or '.join(repr(k) for k in close)}?)" if close else ""
