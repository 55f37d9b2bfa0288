"""Command-line plumbing shared by the launcher and the sweep: config flags, one-line errors."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from absl import flags

from experiments.configs_util import did_you_mean
from experiments.workdir import WorkdirError
from fenchel.data import DataError

# The errors a user can cause and fix; each is printed as one line, without a traceback.
USER_ERRORS = (ValueError, DataError, WorkdirError, FileNotFoundError, PermissionError, FloatingPointError)


def parse_flags(argv, config_flag: str = "config"):
    """Parse absl flags and load the config file with its overrides; returns (other arguments, config).

    A bad flag, a missing or broken config file, or an unknown or ill-typed
    override exits with one line naming the problem.
    """
    path = next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{config_flag}=")), None)
    if path is None and f"--{config_flag}" in argv[:-1]:
        path = argv[argv.index(f"--{config_flag}") + 1]
    if path and not Path(path.split(":", 1)[0]).exists():
        fail(f"config file {path} not found")
    try:
        rest = flags.FLAGS(argv)
        config = getattr(flags.FLAGS, config_flag)  # the file is loaded and the overrides applied by here
    except flags.Error as err:
        fail(_first_line(err))
    except (SyntaxError, ImportError, AttributeError, TypeError, KeyError, *USER_ERRORS) as err:
        message = _describe(err)
        key = re.match(r"unknown config key '([^']+)'", message)
        given = next((a for a in argv if key and a.split("=", 1)[0] == f"--{config_flag}.{key.group(1)}"), None)
        fail(f"{given or path}: {message}")
    return rest, config


def _describe(err) -> str:
    """One line for a config error; ml_collections' unknown-key message becomes 'unknown config key …'."""
    text = str(err.args[0] if err.args else err).replace("\\n", "\n")
    lines = [ln.strip().strip("'\"\\") for ln in text.splitlines() if ln.strip()]
    hint = next((ln for ln in lines if "did you mean" in ln.lower()), "")
    if isinstance(err, (AttributeError, KeyError)) and lines:
        if not hint:
            from configs import default
            return f"unknown config key {lines[0]!r}" + did_you_mean(lines[0], default.get_config().keys())
        return f"unknown config key {lines[0]!r} ({hint})"
    if isinstance(err, SyntaxError):
        return f"syntax error in {err.filename}, line {err.lineno}: {err.msg}"
    return f"{type(err).__name__}: " + (lines[0] if lines else "") + (f" ({hint})" if hint else "")


def _first_line(err) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    hint = next((ln for ln in lines if "did you mean" in ln.lower()), "")
    first = lines[0] if lines else type(err).__name__
    return f"{first} ({hint})" if hint and hint not in first else first


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)
