"""The one module that reads and writes a run's workdir (stdlib + numpy only: cheap to import).

A workdir holds:

  config.json          the resolved config
  metrics.jsonl        one JSON object per line, appended per evaluation
  checkpoint.msgpack   b"FENCHEL-CHECKPOINT 1\\n", a JSON header line (sha256, size, meta), the payload
  summary.json         final figures
  history/chunk_<first step>.npz   optional parameter snapshots ([T, ...] per name, plus `steps`)
  .lock                flock held by the run using the workdir (never deleted: deleting lock files races)

Every whole-file write is atomic (temporary file in the same folder, fsync,
rename); a crash leaves the old file or the new one, plus at most a
`.<name>.tmp-XXXX` leftover that `Workdir.prepare` removes. Nothing is ever
dropped silently: a torn last metrics line is set aside in metrics.torn.txt,
superseded records in metrics.superseded.jsonl, and every other damage is a
`WorkdirError` naming the file and saying what to do.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

CHECKPOINT_MAGIC = b"FENCHEL-CHECKPOINT 1\n"
_TMP_GLOB = ".*.tmp-*"
_WARNED: set = set()  # (file, reason) pairs already warned about in this process


class WorkdirError(Exception):
    """A workdir file is missing, damaged or unusable; the message names the file and the fix."""


class WorkdirBusy(WorkdirError):
    """Another process holds the workdir's lock."""


# ---------------------------------------------------------------- atomic files
def _umask() -> int:
    """The process umask, read without leaving it changed."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort: not every filesystem allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder, fsync, rename.

    On any failure the old file (if any) is untouched and the temporary file is removed.
    The new file gets the umask's normal mode (0o666 & ~umask), not mkstemp's 0600.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _json_default(o):
    """numpy (and other array-like) values → plain Python values."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray) or hasattr(o, "__array__"):
        return np.asarray(o).tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def to_json(obj, indent=None) -> str:
    """json.dumps with numpy scalars and arrays turned into Python values."""
    return json.dumps(obj, indent=indent, default=_json_default)


def atomic_write_json(path, obj) -> None:
    """Atomically write `obj` as indented JSON (numpy values allowed)."""
    atomic_write_bytes(path, (to_json(obj, indent=1) + "\n").encode())


def config_hash(config: dict) -> str:
    """sha256 of the canonical JSON of a config (key order does not matter)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _warn_once(path: Path, message: str) -> None:
    key = (str(path), message)
    if key not in _WARNED:
        _WARNED.add(key)
        print(f"warning: {message}", file=sys.stderr)


def _append_durably(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------- workdir
class Workdir:
    """A run's workdir: every read and write of its files goes through here."""

    CONFIG = "config.json"
    METRICS = "metrics.jsonl"
    METRICS_TORN = "metrics.torn.txt"
    METRICS_SUPERSEDED = "metrics.superseded.jsonl"
    CHECKPOINT = "checkpoint.msgpack"
    SUMMARY = "summary.json"
    HISTORY = "history"
    LOCK = ".lock"

    writable = True  # False for `ReadOnlyWorkdir`

    def __init__(self, path):
        self.path = Path(path).absolute()  # messages name files by their full path
        self._lock_fd = None  # fd of .lock while this object holds it

    def __repr__(self):
        return f"Workdir({str(self.path)!r})"

    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def checkpoint_path(self) -> Path:
        return self.path / self.CHECKPOINT

    @property
    def summary_path(self) -> Path:
        return self.path / self.SUMMARY

    @property
    def history_dir(self) -> Path:
        return self.path / self.HISTORY

    # -------------------------------------------------------- setup
    def prepare(self) -> list[str]:
        """Check the workdir can be used (creating it), then remove leftover temporary files.

        Returns the removed names (relative to the workdir). Leftovers are only
        removed when no other process holds the lock (they may be its writes in flight).
        """
        path = self.path
        fix = "choose another --workdir"
        if path.exists() and not path.is_dir():
            raise WorkdirError(f"{path} is a file, not a directory: {fix}")
        for parent in reversed(path.absolute().parents):
            if parent.exists() and not parent.is_dir():
                raise WorkdirError(f"cannot use {path}: {parent} is a file, not a directory: {fix}")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # PermissionError, NotADirectoryError, FileExistsError, read-only filesystem, …
            raise WorkdirError(f"cannot create {path} ({e.strerror or e}): {fix} or fix its permissions") from e
        try:
            fd, probe = tempfile.mkstemp(dir=path, prefix=".write-probe.tmp-")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise WorkdirError(f"{path} is not writable ({e.strerror or e}): {fix} or fix its permissions") from e
        if self._lock_fd is not None:
            return self._remove_temp_files()
        try:
            with self.lock():
                return self._remove_temp_files()
        except WorkdirBusy:
            return []  # the other run owns any temporary files; lock() will refuse this one

    def _remove_temp_files(self) -> list[str]:
        removed = []
        for folder in (self.path, self.history_dir):
            if folder.is_dir():
                for p in sorted(folder.glob(_TMP_GLOB)):
                    if p.is_file():
                        p.unlink()
                        removed.append(str(p.relative_to(self.path)))
        return removed

    @contextlib.contextmanager
    def lock(self):
        """Hold an exclusive flock on <workdir>/.lock (containing our pid); WorkdirBusy if taken."""
        lock_path = self.path / self.LOCK
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise WorkdirError(f"cannot open {lock_path} ({e.strerror or e}); check the workdir's permissions") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            pid = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirBusy(f"another run (pid {pid}) is using {self.path}; "
                                  "wait for it to finish or use another --workdir") from None
            raise WorkdirError(f"cannot lock {lock_path} ({e.strerror or e})") from e
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._lock_fd = fd
            yield self
        finally:
            self._lock_fd = None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # -------------------------------------------------------- JSON files
    @staticmethod
    def _read_json_object(path: Path, fix: str):
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise WorkdirError(f"cannot read {path} ({e}); {fix}") from e
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise WorkdirError(f"{path} is corrupted (not valid JSON: {e}); {fix}") from e
        if not isinstance(obj, dict):
            raise WorkdirError(f"{path} is corrupted (a JSON {type(obj).__name__}, not an object); {fix}")
        return obj

    def read_config(self) -> dict | None:
        """config.json, or None when there is none."""
        return self._read_json_object(self.config_path, "restore it or use a fresh workdir")

    def write_config(self, config: dict) -> None:
        atomic_write_json(self.config_path, config)

    def read_summary(self) -> dict | None:
        """summary.json, or None when the run has not finished."""
        return self._read_json_object(self.summary_path, "delete it and relaunch the run to rewrite it")

    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.summary_path, summary)

    # -------------------------------------------------------- metrics
    def append_metrics(self, record: dict) -> None:
        """Append one record as a JSON line (flushed and fsynced)."""
        if not isinstance(record, dict):
            raise TypeError(f"a metrics record is a dict, got {type(record).__name__}")
        prefix = b""
        if self._metrics_unterminated():  # a crash cut the last line's write short
            if self._parse_metrics()[1] is None:
                prefix = b"\n"  # a complete record that only lacks its newline
            else:
                self.repair_torn_metrics()
        _append_durably(self.metrics_path, prefix + (to_json(record) + "\n").encode())

    def _metrics_unterminated(self) -> bool:
        try:
            with open(self.metrics_path, "rb") as f:
                if f.seek(0, os.SEEK_END) == 0:
                    return False
                f.seek(-1, os.SEEK_END)
                return f.read(1) != b"\n"
        except FileNotFoundError:
            return False

    def _parse_metrics(self):
        """(records, torn last line or None, raw lines each with its newline)."""
        path = self.metrics_path
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return [], None, []
        parts = data.split(b"\n")
        raw = [part + b"\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
        records, torn = [], None
        for lineno, line in enumerate(raw, 1):
            unterminated = not line.endswith(b"\n")
            text = line.rstrip(b"\n")
            try:
                if not text.strip():
                    raise ValueError("empty line")
                record = json.loads(text.decode("utf-8"))
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                if unterminated:
                    torn = line
                    break
                raise WorkdirError(f"{path}:{lineno}: not a JSON record ({e}); "
                                   "the file is corrupted: repair or delete that line") from e
            if not isinstance(record, dict):
                raise WorkdirError(f"{path}:{lineno}: not a JSON record (a {type(record).__name__}, not an "
                                   "object); the file is corrupted: repair or delete that line")
            records.append(record)
        return records, torn, raw[:len(records)]

    def read_metrics(self) -> list[dict]:
        """Every record of metrics.jsonl; a torn last line (a crash mid-write) is ignored with a warning."""
        records, torn, _ = self._parse_metrics()
        if torn is not None:
            shown = torn.decode("utf-8", errors="replace")
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            _warn_once(self.metrics_path, f"{self.metrics_path}: ignoring a torn last line (an interrupted write): "
                                          f"{shown!r}")
        return records

    def repair_torn_metrics(self) -> bool:
        """Move a torn last line to metrics.torn.txt; returns whether there was one."""
        _, torn, raw = self._parse_metrics()
        if torn is None:
            return False
        _append_durably(self.path / self.METRICS_TORN, torn + b"\n")  # set aside first: nothing is lost
        atomic_write_bytes(self.metrics_path, b"".join(raw))
        return True

    def supersede_metrics_after(self, epoch: int) -> int:
        """Move records with epoch > `epoch` (a crash before their checkpoint) to metrics.superseded.jsonl.

        Returns how many moved; a torn last line is repaired first.
        """
        self.repair_torn_metrics()
        records, _, raw = self._parse_metrics()
        later = [isinstance(r.get("epoch"), (int, float)) and r["epoch"] > epoch for r in records]
        if not any(later):
            return 0
        moved = [line for line, late in zip(raw, later) if late]
        _append_durably(self.path / self.METRICS_SUPERSEDED, b"".join(moved))
        atomic_write_bytes(self.metrics_path, b"".join(line for line, late in zip(raw, later) if not late))
        return len(moved)

    # -------------------------------------------------------- checkpoint
    def save_checkpoint(self, payload: bytes, meta: dict) -> None:
        """Atomically write the checkpoint: magic line, JSON header (sha256, size, **meta), payload."""
        payload = bytes(payload)
        clash = {"sha256", "size"} & set(meta)
        if clash:
            raise ValueError(f"checkpoint meta may not set {sorted(clash)}")
        header = {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload), **meta}
        atomic_write_bytes(self.checkpoint_path, CHECKPOINT_MAGIC + (to_json(header) + "\n").encode() + payload)

    def load_checkpoint(self, expected_config_hash: str | None = None) -> tuple[dict, bytes] | None:
        """(header, payload) after checking magic, size, sha256 and (if given) the config hash; None if missing."""
        path = self.checkpoint_path
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise WorkdirError(f"cannot read {path} ({e.strerror or e}); fix it or delete it to restart") from e
        restart = "delete it to restart the run from scratch"
        if not data.startswith(CHECKPOINT_MAGIC):
            raise WorkdirError(f"{path} is corrupted or in an old format (no {CHECKPOINT_MAGIC.strip().decode()!r} "
                               f"line); {restart}")
        end = data.find(b"\n", len(CHECKPOINT_MAGIC))
        if end < 0:
            raise WorkdirError(f"{path} is corrupted (truncated inside its header); {restart}")
        try:
            header = json.loads(data[len(CHECKPOINT_MAGIC):end].decode("utf-8"))
        except ValueError as e:
            raise WorkdirError(f"{path} is corrupted (bad header: {e}); {restart}") from e
        if not (isinstance(header, dict) and isinstance(header.get("sha256"), str)
                and isinstance(header.get("size"), int)):
            raise WorkdirError(f"{path} is corrupted (its header lacks sha256 or size); {restart}")
        payload = data[end + 1:]
        if len(payload) != header["size"]:
            raise WorkdirError(f"{path} is corrupted (size mismatch: {len(payload)} payload bytes, the header says "
                               f"{header['size']}; truncated?); {restart}")
        if hashlib.sha256(payload).hexdigest() != header["sha256"]:
            raise WorkdirError(f"{path} is corrupted (checksum mismatch); {restart}")
        if expected_config_hash is not None and header.get("config_hash") != expected_config_hash:
            raise WorkdirError(f"{path} was written under another config; relaunch with the original config or "
                               "use a fresh workdir")
        return header, payload


# ---------------------------------------------------------------- parameter history
_CHUNK_OVERHEAD = 512  # generous bound on the .npz bytes around one array (zip headers, npy header)


class ReadOnlyWorkdir(Workdir):
    """A workdir as process k > 0 of a multi-host run sees it: it reads the files, and process 0 alone
    writes them (every write here is a no-op)."""

    writable = False

    def prepare(self) -> list[str]:
        return []

    @contextlib.contextmanager
    def lock(self):
        yield self

    def write_config(self, config: dict) -> None:
        pass

    def write_summary(self, summary: dict) -> None:
        pass

    def append_metrics(self, record: dict) -> None:
        pass

    def repair_torn_metrics(self) -> bool:
        return False

    def supersede_metrics_after(self, epoch: int) -> int:
        return 0

    def save_checkpoint(self, payload: bytes, meta: dict) -> None:
        pass


def _chunk_step(path: Path) -> int:
    return int(path.stem.split("_", 1)[1])


def _chunks(history_dir: Path) -> list[Path]:
    if not history_dir.is_dir():
        return []
    return sorted(history_dir.glob("chunk_*.npz"), key=_chunk_step)


def _read_chunk(path: Path, steps_only: bool = False) -> tuple[np.ndarray, dict]:
    """(steps, arrays) of one chunk (arrays empty when steps_only); WorkdirError naming it when damaged."""
    fix = "delete it (and the chunks after it) or restore it"
    try:
        with np.load(path, allow_pickle=False) as z:
            names = [k for k in z.files if k != "steps"]
            steps = z["steps"] if "steps" in z.files else None
            arrays = {} if steps_only else {k: z[k] for k in names}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise WorkdirError(f"{path} is corrupted ({e}); {fix}") from e
    if steps is None or steps.ndim != 1 or any(a.shape[:1] != steps.shape for a in arrays.values()):
        raise WorkdirError(f"{path} is corrupted (missing or inconsistent `steps` array); {fix}")
    return steps.astype(np.int64), arrays


def _write_chunk(path: Path, steps: np.ndarray, arrays: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, steps=np.asarray(steps, np.int64), **arrays)
    atomic_write_bytes(path, buf.getvalue())


class ParamHistory:
    """Parameter snapshots of a run, in float32 chunks under <workdir>/history, bounded by max_bytes.

    `add` buffers, `flush` writes the buffer as one chunk (call it with each
    checkpoint), `discard_after(step)` drops snapshots a resumed run will redo.
    """

    def __init__(self, workdir, max_bytes: int):
        self.workdir = workdir if isinstance(workdir, Workdir) else Workdir(workdir)
        self.max_bytes = int(max_bytes)
        self.truncated = False
        self._steps: list[int] = []
        self._snaps: list[dict] = []
        self._disk_bytes = None  # cached size of the chunks on disk
        self._disk_last = None  # cached (last step on disk,) once looked up

    @staticmethod
    def _cost(snap: dict, first: bool) -> int:
        """Bytes a snapshot adds to its chunk (the first one also pays the chunk's headers)."""
        cost = 8 + sum(a.nbytes for a in snap.values())
        if first:  # zip and npy headers per array (and for `steps`), the zip's end records
            cost += _CHUNK_OVERHEAD * (len(snap) + 2) + 2 * sum(len(k) for k in snap)
        return cost

    def _buffer_bytes(self) -> int:
        return sum(self._cost(s, i == 0) for i, s in enumerate(self._snaps))

    def _disk(self) -> int:
        if self._disk_bytes is None:
            self._disk_bytes = sum(p.stat().st_size for p in _chunks(self.workdir.history_dir))
        return self._disk_bytes

    def _last_step_on_disk(self):
        if self._disk_last is None:
            chunks = _chunks(self.workdir.history_dir)
            steps = _read_chunk(chunks[-1], steps_only=True)[0] if chunks else []
            self._disk_last = (int(steps[-1]) if len(steps) else None,)
        return self._disk_last[0]

    def total_bytes(self) -> int:
        """Bytes of the chunks on disk plus a bound on the buffered snapshots' chunk."""
        return self._disk() + self._buffer_bytes()

    def add(self, step: int, arrays: dict) -> bool:
        """Buffer float32 copies of `arrays` at `step`; False (and recording stops) past max_bytes."""
        if self.truncated:
            return False
        step = int(step)
        if "steps" in arrays:
            raise ValueError("a history array may not be called 'steps'")
        snap = {k: np.array(v, dtype=np.float32, copy=True) for k, v in arrays.items()}
        last = self._steps[-1] if self._steps else self._last_step_on_disk()
        if last is not None and step <= last:
            raise ValueError(f"history steps must increase: step {step} after {last} (call discard_after() "
                             "when resuming)")
        if self._snaps:
            first = self._snaps[0]
            if set(snap) != set(first) or any(snap[k].shape != first[k].shape for k in first):
                raise ValueError(f"the snapshot at step {step} has other names or shapes than the buffered ones")
        if self.total_bytes() + self._cost(snap, not self._snaps) > self.max_bytes:
            self.truncated = True
            _warn_once(self.workdir.history_dir, f"{self.workdir.history_dir}: the parameter history reached "
                                                 f"max_bytes={self.max_bytes} at step {step}; recording stops")
            return False
        self._steps.append(step)
        self._snaps.append(snap)
        return True

    def flush(self) -> Path | None:
        """Write the buffered snapshots as one chunk (atomically); its path, or None if nothing was buffered."""
        if not self._snaps:
            return None
        folder = self.workdir.history_dir
        folder.mkdir(exist_ok=True)
        path = folder / f"chunk_{self._steps[0]:09d}.npz"
        if path.exists():
            raise WorkdirError(f"{path} already exists: history steps must increase; call discard_after() when "
                               "resuming, or delete the history folder")
        arrays = {k: np.stack([s[k] for s in self._snaps]) for k in self._snaps[0]}
        _write_chunk(path, np.asarray(self._steps), arrays)
        self._disk_bytes = self._disk() + path.stat().st_size
        self._disk_last = (self._steps[-1],)
        self._steps, self._snaps = [], []
        return path

    def discard_after(self, step: int) -> int:
        """Remove the snapshots with a step > `step`, buffered and on disk; returns how many."""
        keep = [i for i, s in enumerate(self._steps) if s <= step]
        removed = len(self._steps) - len(keep)
        self._steps = [self._steps[i] for i in keep]
        self._snaps = [self._snaps[i] for i in keep]
        for path in _chunks(self.workdir.history_dir):
            steps = _read_chunk(path, steps_only=True)[0]
            mask = steps <= step
            if mask.all():
                continue
            removed += int((~mask).sum())
            if mask.any():
                _, arrays = _read_chunk(path)
                _write_chunk(path, steps[mask], {k: a[mask] for k, a in arrays.items()})
            else:
                path.unlink()
        self._disk_bytes = self._disk_last = None
        self.truncated = False  # room freed: a resumed run records again until the bound
        return removed


def read_history(workdir_path) -> tuple[np.ndarray, dict]:
    """(steps [T], {name: [T, ...]}) from every chunk of <workdir>/history, in step order."""
    history_dir = Workdir(workdir_path).history_dir
    steps, arrays, names = [], {}, None
    for path in _chunks(history_dir):
        s, a = _read_chunk(path)
        if names is None:
            names = set(a)
        elif set(a) != names or any(a[k].shape[1:] != arrays[k][0].shape[1:] for k in a):
            raise WorkdirError(f"{path} holds other arrays or shapes than the chunks before it; delete it")
        steps.append(s)
        for k, v in a.items():
            arrays.setdefault(k, []).append(v)
    if not steps:
        return np.zeros(0, np.int64), {}
    all_steps = np.concatenate(steps)
    if np.any(np.diff(all_steps) <= 0):
        raise WorkdirError(f"{history_dir} has overlapping chunks (steps do not increase); delete the chunks "
                           "written after the last good one")
    return all_steps, {k: np.concatenate(v) for k, v in arrays.items()}


def read_run_history(workdir_path) -> tuple[Workdir, dict, np.ndarray, dict]:
    """(Workdir, config.json, history steps, history arrays) of a finished or running run, for the analyses;
    a WorkdirError naming the path if it is not a run's workdir or holds no parameter history."""
    wd = Workdir(workdir_path)
    if not wd.path.is_dir():
        raise WorkdirError(f"{wd.path} is not a directory (expected a run's workdir)")
    config = wd.read_config()
    if config is None:
        raise WorkdirError(f"{wd.config_path} not found: {wd.path} is not a run's workdir")
    steps, arrays = read_history(wd.path)
    if len(steps) == 0:
        raise WorkdirError(f"{wd.history_dir} holds no parameter history: run with --config.record_every=k")
    return wd, config, steps, arrays
