"""experiments.workdir: atomic files, workdir checks, lock, metrics, checkpoint, parameter history."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from experiments import workdir as wd
from experiments.workdir import ParamHistory, Workdir, WorkdirBusy, WorkdirError, read_history

ROOT = Path(__file__).resolve().parent.parent


def _is_root():
    return os.geteuid() == 0


# ---------------------------------------------------------------- atomic writes
def test_atomic_write_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "file.bin"
    wd.atomic_write_bytes(target, b"old")
    with pytest.raises(TypeError):
        wd.atomic_write_bytes(target, object())  # fails after the temporary file exists
    with pytest.raises(TypeError):
        wd.atomic_write_json(target, {"x": object()})
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_atomic_write_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        wd.atomic_write_bytes(tmp_path / "a", b"x")
        os.umask(0o027)
        wd.atomic_write_json(tmp_path / "b", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o640
    assert os.umask(old) == old  # the umask read left it as it was


def test_atomic_write_json_converts_numpy(tmp_path):
    wd.atomic_write_json(tmp_path / "a.json", {"f": np.float32(0.5), "i": np.int64(3), "a": np.arange(2)})
    assert json.loads((tmp_path / "a.json").read_text()) == {"f": 0.5, "i": 3, "a": [0, 1]}


def test_config_hash_ignores_key_order():
    assert wd.config_hash({"a": 1, "b": [1, 2]}) == wd.config_hash({"b": [1, 2], "a": 1})
    assert wd.config_hash({"a": 1}) != wd.config_hash({"a": 2})


# ---------------------------------------------------------------- prepare
def test_prepare_removes_temp_leftovers_only(tmp_path):
    w = Workdir(tmp_path / "run")
    w.prepare()
    w.history_dir.mkdir()
    for p in (w.path / ".config.json.tmp-abc123", w.history_dir / ".chunk_000000001.npz.tmp-x"):
        p.write_bytes(b"partial")
    w.write_config({"a": 1})
    assert sorted(w.prepare()) == [".config.json.tmp-abc123", "history/.chunk_000000001.npz.tmp-x"]
    assert sorted(p.name for p in w.path.iterdir()) == [".lock", "config.json", "history"]
    assert list(w.history_dir.iterdir()) == []
    assert w.read_config() == {"a": 1}


def test_prepare_keeps_temp_files_of_a_run_holding_the_lock(tmp_path):
    w = Workdir(tmp_path)
    w.prepare()
    (tmp_path / ".metrics.jsonl.tmp-1").write_bytes(b"in flight")
    with Workdir(tmp_path).lock():  # another holder (another open file description)
        assert w.prepare() == []
    assert (tmp_path / ".metrics.jsonl.tmp-1").exists()
    assert w.prepare() == [".metrics.jsonl.tmp-1"]


def test_prepare_workdir_is_a_file(tmp_path):
    f = tmp_path / "run"
    f.write_text("x")
    with pytest.raises(WorkdirError, match=rf"{f} is a file, not a directory: choose another --workdir"):
        Workdir(f).prepare()


def test_prepare_workdir_under_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(WorkdirError, match=rf"{f} is a file, not a directory"):
        Workdir(f / "sub" / "run").prepare()


def test_prepare_uncreatable_or_unwritable(tmp_path):
    with pytest.raises(WorkdirError, match="cannot create /proc/fenchel-test/run"):
        Workdir("/proc/fenchel-test/run").prepare()  # refused even to root
    with pytest.raises(WorkdirError, match="/proc/self is not writable"):
        Workdir("/proc/self").prepare()


@pytest.mark.skipif(_is_root(), reason="root ignores permission bits")
def test_prepare_read_only_directory(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        with pytest.raises(WorkdirError, match=f"{d} is not writable"):
            Workdir(d).prepare()
        with pytest.raises(WorkdirError, match=f"cannot create {d / 'run'}"):
            Workdir(d / "run").prepare()
    finally:
        d.chmod(0o700)


# ---------------------------------------------------------------- lock
_HOLDER = textwrap.dedent("""
    import sys, time
    from experiments.workdir import Workdir
    with Workdir(sys.argv[1]).lock():
        print("locked", flush=True)
        sys.stdin.readline()
""")


def test_lock_refuses_a_second_process_and_is_released(tmp_path):
    w = Workdir(tmp_path)
    w.prepare()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirBusy, match=rf"another run \(pid {holder.pid}\) is using {tmp_path}; wait"):
            with w.lock():
                pass
    finally:
        holder.communicate("\n", timeout=30)
    assert holder.returncode == 0
    with w.lock():  # free once the holder has exited
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    with w.lock():  # and released again on our exit
        pass


def test_lock_released_when_the_body_raises(tmp_path):
    w = Workdir(tmp_path)
    with pytest.raises(RuntimeError):
        with w.lock():
            raise RuntimeError
    with Workdir(tmp_path).lock():
        pass


# ---------------------------------------------------------------- config and summary
def test_corrupt_config_and_summary_name_the_file(tmp_path):
    w = Workdir(tmp_path)
    assert w.read_config() is None and w.read_summary() is None
    w.config_path.write_text('{"trainer": "fen')
    with pytest.raises(WorkdirError, match=rf"{w.config_path} is corrupted \(not valid JSON"):
        w.read_config()
    w.summary_path.write_text("[1, 2]")
    with pytest.raises(WorkdirError, match=rf"{w.summary_path} is corrupted"):
        w.read_summary()
    w.write_summary({"test_accuracy": np.float64(0.9)})
    assert w.read_summary() == {"test_accuracy": 0.9}


def test_messages_name_the_full_path_of_a_relative_workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("nope")
    with pytest.raises(WorkdirError, match=rf"^{tmp_path / 'run' / 'config.json'} is corrupted"):
        Workdir("run").read_config()


# ---------------------------------------------------------------- metrics
def test_metrics_round_trip(tmp_path):
    w = Workdir(tmp_path)
    assert w.read_metrics() == []
    w.append_metrics({"epoch": 1, "acc": np.float32(0.5)})
    w.append_metrics({"epoch": 2, "acc": 0.75})
    assert w.read_metrics() == [{"epoch": 1, "acc": 0.5}, {"epoch": 2, "acc": 0.75}]
    assert w.metrics_path.read_text().count("\n") == 2


def test_torn_last_line_is_ignored_with_one_warning_and_repaired(tmp_path, capsys):
    w = Workdir(tmp_path)
    w.append_metrics({"epoch": 1})
    with open(w.metrics_path, "a") as f:
        f.write('{"epoch": 2, "te')  # a crash mid-write
    assert w.read_metrics() == [{"epoch": 1}]
    assert w.read_metrics() == [{"epoch": 1}]
    err = capsys.readouterr().err
    assert err.count("ignoring a torn last line") == 1 and str(w.metrics_path) in err
    assert w.repair_torn_metrics() is True
    assert w.metrics_path.read_text() == '{"epoch": 1}\n'
    assert (tmp_path / "metrics.torn.txt").read_text() == '{"epoch": 2, "te\n'
    assert w.repair_torn_metrics() is False


def test_append_after_a_torn_line_sets_it_aside_first(tmp_path):
    w = Workdir(tmp_path)
    w.append_metrics({"epoch": 1})
    with open(w.metrics_path, "a") as f:
        f.write('{"epo')
    w.append_metrics({"epoch": 2})  # must not glue onto the torn text
    assert w.read_metrics() == [{"epoch": 1}, {"epoch": 2}]
    assert (tmp_path / "metrics.torn.txt").read_text() == '{"epo\n'
    with open(w.metrics_path, "a") as f:
        f.write('{"epoch": 3}')  # complete, only the newline is missing
    w.append_metrics({"epoch": 4})
    assert [r["epoch"] for r in w.read_metrics()] == [1, 2, 3, 4]


@pytest.mark.parametrize("bad, lineno", [(b"garbage\n", 2), (b"\n", 2), (b"[1, 2]\n", 2), (b"\xff\xfe\n", 2)])
def test_corrupt_middle_line_raises_and_changes_nothing(tmp_path, bad, lineno):
    w = Workdir(tmp_path)
    data = b'{"epoch": 1}\n' + bad + b'{"epoch": 3}\n'
    w.metrics_path.write_bytes(data)
    for call in (w.read_metrics, w.repair_torn_metrics, lambda: w.supersede_metrics_after(1)):
        with pytest.raises(WorkdirError, match=rf"{w.metrics_path}:{lineno}: not a JSON record .*repair or delete"):
            call()
        assert w.metrics_path.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_non_object_last_line_is_an_error_not_a_torn_write(tmp_path):
    w = Workdir(tmp_path)
    w.metrics_path.write_bytes(b'{"epoch": 1}\n3')
    with pytest.raises(WorkdirError, match=":2: not a JSON record"):
        w.read_metrics()


def test_supersede_moves_later_epochs(tmp_path):
    w = Workdir(tmp_path)
    for e in (1, 2, 3, 4):
        w.append_metrics({"epoch": e, "acc": e / 10})
    assert w.supersede_metrics_after(2) == 2
    assert [r["epoch"] for r in w.read_metrics()] == [1, 2]
    moved = [json.loads(line) for line in (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()]
    assert moved == [{"epoch": 3, "acc": 0.3}, {"epoch": 4, "acc": 0.4}]
    assert w.supersede_metrics_after(2) == 0
    w.append_metrics({"epoch": 3, "acc": 0.35})
    w.append_metrics({"epoch": 4, "acc": 0.45})
    assert w.supersede_metrics_after(3) == 1  # appended to the earlier superseded records
    assert (tmp_path / "metrics.superseded.jsonl").read_text().count("\n") == 3
    assert w.supersede_metrics_after(0) == 3
    assert w.metrics_path.read_bytes() == b""


# ---------------------------------------------------------------- checkpoint
def test_checkpoint_round_trip(tmp_path):
    w = Workdir(tmp_path)
    assert w.load_checkpoint() is None
    payload = bytes(range(256)) * 3 + b"\n\n"
    w.save_checkpoint(payload, {"epoch": 3, "config_hash": "abc"})
    header, got = w.load_checkpoint(expected_config_hash="abc")
    assert got == payload and header["epoch"] == 3 and header["size"] == len(payload)
    assert w.checkpoint_path.read_bytes().startswith(b"FENCHEL-CHECKPOINT 1\n{")
    with pytest.raises(ValueError):
        w.save_checkpoint(payload, {"size": 1})


def test_checkpoint_flipped_byte_is_a_checksum_error(tmp_path):
    w = Workdir(tmp_path)
    w.save_checkpoint(b"\x00" * 100, {"epoch": 1})
    data = bytearray(w.checkpoint_path.read_bytes())
    data[-10] ^= 0x01  # same size, one bit off
    w.checkpoint_path.write_bytes(bytes(data))
    with pytest.raises(WorkdirError, match=rf"{w.checkpoint_path} is corrupted \(checksum mismatch\); delete it"):
        w.load_checkpoint()


@pytest.mark.parametrize("cut", [5, 25, -1])
def test_checkpoint_truncated_is_an_error(tmp_path, cut):
    w = Workdir(tmp_path)
    w.save_checkpoint(b"payload" * 10, {"epoch": 1})
    w.checkpoint_path.write_bytes(w.checkpoint_path.read_bytes()[:cut])
    with pytest.raises(WorkdirError, match=rf"{w.checkpoint_path} is corrupted"):
        w.load_checkpoint()


def test_checkpoint_old_format_is_an_error(tmp_path):
    w = Workdir(tmp_path)
    w.checkpoint_path.write_bytes(b"\x83\xa5epoch\x01")  # a raw msgpack from before the header
    with pytest.raises(WorkdirError, match=f"{w.checkpoint_path} is corrupted or in an old format"):
        w.load_checkpoint()


def test_checkpoint_config_hash_mismatch(tmp_path):
    w = Workdir(tmp_path)
    w.save_checkpoint(b"p", {"config_hash": wd.config_hash({"lambda_": 3.0})})
    with pytest.raises(WorkdirError, match="was written under another config; relaunch with the original"):
        w.load_checkpoint(expected_config_hash=wd.config_hash({"lambda_": 1.0}))
    assert w.load_checkpoint(wd.config_hash({"lambda_": 3.0}))[1] == b"p"


# ---------------------------------------------------------------- parameter history
def _snap(step):
    return {"w": np.full((3, 2), step, np.float64), "b": np.arange(2) + step}


def test_history_round_trip_over_chunks(tmp_path):
    h = ParamHistory(Workdir(tmp_path), max_bytes=10**6)
    for step in (1, 2, 3):
        assert h.add(step, _snap(step))
    assert h.flush().name == "chunk_000000001.npz"
    assert h.flush() is None
    for step in (10, 20):
        h.add(step, _snap(step))
    h.flush()
    steps, arrays = read_history(tmp_path)
    np.testing.assert_array_equal(steps, [1, 2, 3, 10, 20])
    assert arrays["w"].shape == (5, 3, 2) and arrays["w"].dtype == np.float32
    np.testing.assert_array_equal(arrays["b"][:, 1], [2, 3, 4, 11, 21])
    assert h.total_bytes() == sum(p.stat().st_size for p in (tmp_path / "history").iterdir())
    with pytest.raises(ValueError, match="must increase"):
        ParamHistory(Workdir(tmp_path), 10**6).add(20, _snap(20))


def test_history_add_copies(tmp_path):
    h = ParamHistory(Workdir(tmp_path), max_bytes=10**6)
    a = {"w": np.zeros(3, np.float32)}
    h.add(1, a)
    a["w"][:] = 7
    h.flush()
    np.testing.assert_array_equal(read_history(tmp_path)[1]["w"], [[0, 0, 0]])


def test_history_stops_at_max_bytes(tmp_path, capsys):
    big = {"w": np.zeros(1000, np.float32)}  # 4000 bytes a snapshot
    h = ParamHistory(Workdir(tmp_path), max_bytes=20_000)
    recorded = [s for s in range(1, 11) if h.add(s, big)]
    h.flush()
    assert h.truncated and 2 <= len(recorded) < 5 and recorded == list(range(1, len(recorded) + 1))
    assert not h.add(100, {"w": np.zeros(1, np.float32)})  # stays stopped
    h.flush()
    assert h.total_bytes() <= 20_000
    assert sum(p.stat().st_size for p in (tmp_path / "history").iterdir()) <= 20_000
    np.testing.assert_array_equal(read_history(tmp_path)[0], recorded)
    assert capsys.readouterr().err.count("recording stops") == 1


def test_history_discard_after(tmp_path):
    h = ParamHistory(Workdir(tmp_path), max_bytes=10**6)
    for step in (1, 2, 3):
        h.add(step, _snap(step))
    h.flush()
    for step in (4, 5):
        h.add(step, _snap(step))
    h.flush()
    h.add(6, _snap(6))  # buffered only
    assert h.discard_after(2) == 4
    assert [p.name for p in (tmp_path / "history").iterdir()] == ["chunk_000000001.npz"]
    steps, arrays = read_history(tmp_path)
    np.testing.assert_array_equal(steps, [1, 2])
    np.testing.assert_array_equal(arrays["w"][:, 0, 0], [1, 2])
    h.add(3, _snap(30))  # a resumed run records the same steps again
    h.flush()
    steps, arrays = read_history(tmp_path)
    np.testing.assert_array_equal(steps, [1, 2, 3])
    np.testing.assert_array_equal(arrays["w"][:, 0, 0], [1, 2, 30])
    assert h.discard_after(0) == 3 and read_history(tmp_path)[0].size == 0


def test_history_corrupt_chunk_names_it(tmp_path):
    h = ParamHistory(Workdir(tmp_path), max_bytes=10**6)
    h.add(1, _snap(1))
    path = h.flush()
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(WorkdirError, match=rf"{path} is corrupted"):
        read_history(tmp_path)


# ---------------------------------------------------------------- imports
def test_module_does_not_import_jax():
    code = "import experiments.workdir, sys; assert 'jax' not in sys.modules and 'flax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)

