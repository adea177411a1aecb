"""Locks that hold on shared file systems (store.Lease): two processes exclude each other, a waiter names the
holder and gives up after its bound, a holder killed on this host or silent on another node is detected and its
lock broken, and temp dirs of killed builders are removed."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.store import LockBusy, Lease, acquire, cached_dir, dir_state, read_holder

REPO = Path(__file__).resolve().parents[1]

HOLD = """
import sys, time
from pathlib import Path
from harness.store import acquire, cached_dir
path, mode = Path(sys.argv[1]), sys.argv[2]
if mode == "lock":
    acquire(path, what="test", heartbeat_s=0.2, stale_s=2)
    print("held", flush=True)
    time.sleep(600)
else:                                   # a builder killed mid-build
    def build(tmp):
        (tmp / "half").write_text("x")
        print("building", flush=True)
        time.sleep(600)
    cached_dir(path, "k", build)
"""


def holder_process(path, mode="lock"):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), mode], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() in ("held", "building")
    return proc


def test_two_processes_exclude_each_other_and_a_killed_holder_frees_the_lock(tmp_path):
    lock = tmp_path / "run.lock"
    proc = holder_process(lock)
    try:
        t0 = time.monotonic()
        with pytest.raises(LockBusy) as e:
            acquire(lock, what="run X", timeout_s=1.0, stale_s=5)
        waited = time.monotonic() - t0
        msg = str(e.value)
        # the holder is named: host, pid, start time; the wait was bounded
        assert f"host {socket.gethostname()}, pid {proc.pid}" in msg and "started 20" in msg and "run X" in msg
        assert 1.0 <= waited < 4
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the holder died on this host: its pid is gone, so the lock is taken at once (no staleness wait)
    t0 = time.monotonic()
    lease = acquire(lock, timeout_s=30, stale_s=60)
    assert time.monotonic() - t0 < 5
    assert read_holder(lock)["pid"] == os.getpid()
    lease.release()
    assert not lock.exists()


def _fake_holder(lock: Path, host="node17", pid=4242):
    lock.write_text(json.dumps({"host": host, "pid": pid, "job": "123", "started": "2026-12-01T00:00:00Z",
                                "token": "t-" + host}))


def test_a_silent_holder_on_another_node_is_judged_dead_by_its_missing_heartbeat(tmp_path, capsys):
    lock = tmp_path / "run.lock"
    _fake_holder(lock)                  # killed on node17: nobody touches its lock any more
    t0 = time.monotonic()
    lease = acquire(lock, timeout_s=30, stale_s=1.0)
    assert 1.0 <= time.monotonic() - t0 < 5
    assert "broke the stale lock" in capsys.readouterr().err and read_holder(lock)["token"] == lease.token
    lease.release()


def test_a_live_holder_on_another_node_is_never_broken(tmp_path):
    lock = tmp_path / "run.lock"
    _fake_holder(lock)
    stop = threading.Event()

    def heartbeat():                    # node17's job is alive: it keeps touching its lock
        while not stop.wait(0.1):
            os.utime(lock)
    beat = threading.Thread(target=heartbeat)
    beat.start()
    try:
        with pytest.raises(LockBusy, match=r"host node17, pid 4242, Slurm job 123, started 2026-12-01T00:00:00Z"):
            acquire(lock, timeout_s=2.0, stale_s=0.8)
        assert read_holder(lock)["token"] == "t-node17"
    finally:
        stop.set()
        beat.join()


def test_the_holder_heartbeats_and_notices_when_it_lost_the_lock(tmp_path, capsys):
    lock = tmp_path / "run.lock"
    lease = acquire(lock, heartbeat_s=0.05, stale_s=1)
    m0 = lock.stat().st_mtime_ns
    time.sleep(0.3)
    assert lock.stat().st_mtime_ns > m0 and not lease.lost
    _fake_holder(lock)                  # someone judged this process dead and took over
    time.sleep(0.3)
    assert lease.lost and "lost the lock" in capsys.readouterr().err
    lease.release()
    assert read_holder(lock)["token"] == "t-node17"     # never removes a lock that is not its own


def test_killed_builder_leaves_its_temp_dir_which_the_next_builder_removes(tmp_path):
    proc = holder_process(tmp_path, mode="build")
    assert dir_state(tmp_path, "k")[0] == "building"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    [dead_tmp] = list(tmp_path.glob(".k.tmp-*"))
    assert (dead_tmp / "half").exists()
    assert dir_state(tmp_path, "k")[0] == "absent"          # its holder's pid is gone
    path, built = cached_dir(tmp_path, "k", lambda tmp: (tmp / "w").write_text("ok"), timeout_s=30)
    assert built and (path / "w").read_text() == "ok"
    assert not list(tmp_path.glob(".k.tmp-*")) and not (tmp_path / "k.lock").exists()


def test_cached_dir_with_no_wait_reports_the_builder_at_once(tmp_path):
    lease = Lease(tmp_path / "k.lock", what="checkpoint k")
    assert lease.try_acquire()
    try:
        t0 = time.monotonic()
        with pytest.raises(LockBusy) as e:
            cached_dir(tmp_path, "k", lambda tmp: None, timeout_s=0)
        assert time.monotonic() - t0 < 1 and e.value.holder["pid"] == os.getpid()
        assert dir_state(tmp_path, "k") == ("building", read_holder(tmp_path / "k.lock"))
    finally:
        lease.release()
