"""Plain files that never lose work: streamed samples.jsonl, atomic JSON, a checkpoint cache and run locks that
hold on shared file systems (see Lease)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

from harness.types import UserError


def stable_hash(obj) -> str:
    """Short hash of a JSON-able object, independent of dict order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def files_fingerprint(paths) -> str:
    """Content fingerprint of weight/config files: per file its name, size, first and last MiB.

    Cheap for a 70B checkpoint, and any real retraining changes those bytes.
    """
    h = hashlib.sha256()
    for f in sorted(Path(p) for p in paths):
        if not f.is_file():
            continue
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                h.update(fh.read())
    return h.hexdigest()[:16]


def checkpoint_fingerprint(root) -> str | None:
    """files_fingerprint of a local HF checkpoint dir (config.json and weight files); None: not a local dir
    (a hub id, which its revision identifies)."""
    root = Path(root)
    if not root.is_dir():
        return None
    return files_fingerprint(p for p in root.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """write(tmp_path) into a temp file beside `path`, then rename: a kill mid-write leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(path: Path, obj) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    _write_atomic(path, write)


def save_torch_atomic(path: Path, obj) -> None:
    import torch
    _write_atomic(path, lambda tmp: torch.save(obj, tmp))


class SampleStore:
    """samples.jsonl: one JSON record per (example id, sample index), appended as soon as it exists.

    Opening repairs a torn last line (a job killed mid-write) by cutting the file back to the last
    complete record, so a rerun resumes with nothing lost and nothing duplicated.
    """

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        self._repair_and_load()

    def _repair_and_load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good_end, seen = 0, set()
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:
                break                       # no newline: the last write was cut short
            line = data[pos:nl]
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            key = (rec["id"], rec["sample"])
            if key not in seen:
                seen.add(key)
                self.records.append(rec)
            pos = good_end = nl + 1
        if good_end < len(data):
            with self.path.open("r+b") as f:
                f.truncate(good_end)

    def done(self) -> set[tuple[str, int]]:
        return {(r["id"], r["sample"]) for r in self.records}

    def append(self, records: Iterable[dict]) -> None:
        records = list(records)
        if not records:
            return
        with self.path.open("a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.extend(records)


# ------------------------------------------------------------------ locks that hold on shared file systems

HEARTBEAT_S = float(os.environ.get("RQBENCH_LOCK_HEARTBEAT_S", 30))   # a holder touches its lock file this often
STALE_S = float(os.environ.get("RQBENCH_LOCK_STALE_S", 180))           # no touch for this long: the holder is dead
WAIT_S = float(os.environ.get("RQBENCH_LOCK_WAIT_S", 6 * 3600))         # default bound on waiting for a live holder


class LockBusy(UserError):
    """A lock stayed held by a live holder for longer than the caller would wait. The message names the holder."""

    def __init__(self, msg: str, holder: dict):
        super().__init__(msg)
        self.holder = holder


def describe_holder(h: dict) -> str:
    if not h:
        return "a holder that has not written its name yet"
    job = f", Slurm job {h['job']}" if h.get("job") else ""
    return f"host {h.get('host')}, pid {h.get('pid')}{job}, started {h.get('started')}"


class Lease:
    """An exclusive lock that works on NFS, Lustre and GPFS whatever their flock mount options.

    The lock is a file created with O_CREAT|O_EXCL (atomic on every POSIX shared file system) that
    names its holder (host, pid, Slurm job, start time). The holder touches it every HEARTBEAT_S from
    a daemon thread; a waiter that sees neither the holder's name nor the file's mtime change for
    STALE_S — measured on the waiter's own monotonic clock, so node clocks need not agree — knows the
    holder is dead (killed on any node, node lost) and breaks the lock. On the holder's own host a dead
    pid is seen at once. flock is not used at all: mounted `localflock` it excludes only one node's
    processes, mounted `noflock` filelock silently falls back to a same-host-only marker file.
    """

    def __init__(self, path: Path, what: str = "", heartbeat_s: float | None = None, stale_s: float | None = None):
        self.path, self.what = Path(path), what
        self.heartbeat_s = HEARTBEAT_S if heartbeat_s is None else heartbeat_s
        self.stale_s = STALE_S if stale_s is None else stale_s
        self.token = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def me(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID"),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "token": self.token, "what": self.what}

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.me(), f)
            f.flush()
            os.fsync(f.fileno())
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lease:{self.path.name}", daemon=True)
        self._thread.start()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if read_holder(self.path).get("token") != self.token:
                if not self.lost:
                    self.lost = True
                    print(f"[rqbench] warning: lost the lock {self.path} (another job judged this one dead after "
                          f"{self.stale_s:.0f} s without a heartbeat: was this process stopped?)", file=sys.stderr, flush=True)
                return
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if read_holder(self.path).get("token") == self.token:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def read_holder(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _mtime(path: Path):
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def _pid_dead_here(h: dict) -> bool:
    if h.get("host") != socket.gethostname() or not isinstance(h.get("pid"), int):
        return False
    try:
        os.kill(h["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _break(path: Path, judged: dict) -> bool:
    """Remove a dead holder's lock file; True when it was the one judged dead."""
    aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)              # atomic: of two breakers, one moves the file, the other finds none
    except FileNotFoundError:
        return False
    moved = read_holder(aside)
    if moved.get("token") != judged.get("token"):
        try:                                # a fresh holder's lock was moved by mistake: put it back
            os.link(aside, path)
        except OSError:
            pass
        os.unlink(aside)
        return False
    os.unlink(aside)
    print(f"[rqbench] broke the stale lock {path} of {describe_holder(judged)} (dead: no heartbeat)",
          file=sys.stderr, flush=True)
    return True


def acquire(path: Path, what: str = "", timeout_s: float | None = None, on_wait: Callable[[dict], None] | None = None,
            heartbeat_s: float | None = None, stale_s: float | None = None) -> Lease:
    """A held Lease on `path`, waiting at most timeout_s (None: WAIT_S) for a live holder; LockBusy after that."""
    lease = Lease(path, what, heartbeat_s, stale_s)
    timeout_s = WAIT_S if timeout_s is None else timeout_s
    start = time.monotonic()
    seen, seen_since, told = None, start, False
    poll = max(0.02, min(1.0, lease.stale_s / 20))
    while True:
        if lease.try_acquire():
            return lease
        holder, now = read_holder(path), time.monotonic()
        state = (holder.get("token"), _mtime(lease.path))
        if state != seen:
            seen, seen_since = state, now
        if state[1] is not None and (_pid_dead_here(holder) or now - seen_since >= lease.stale_s):
            _break(lease.path, holder)
            continue
        if now - start >= timeout_s:
            raise LockBusy(f"{what or path} is held by {describe_holder(holder)} (lock file {path}, alive: heartbeat "
                           f"within {lease.stale_s:.0f} s); gave up after {timeout_s:.0f} s. Wait for that job, or "
                           f"cancel it; a dead holder's lock is broken automatically.", holder)
        if not told and on_wait is not None:
            on_wait(holder)
        told = True
        time.sleep(poll)


def cached_dir(root: Path, key: str, build: Callable[[Path], None], on_wait: Callable[[dict], None] | None = None,
               timeout_s: float | None = None) -> tuple[Path, bool]:
    """Return root/key, building it with `build(tmp_dir)` if absent. (path, built_here).

    A Lease makes concurrent jobs wait (at most timeout_s; 0: not at all, LockBusy at once) for the
    first builder instead of repeating its work; the build happens in a temp dir renamed into place,
    so nobody ever sees half a directory. Whoever holds the lease removes temp dirs of builders that
    died (killed jobs leave them; a live builder of this key cannot exist while we hold it).
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    if (final / ".complete").exists():
        return final, False
    lease = acquire(root / f"{key}.lock", what=f"checkpoint {key}", timeout_s=timeout_s, on_wait=on_wait)
    try:
        if (final / ".complete").exists():
            return final, False
        for old in root.glob(f".{key}.tmp-*"):
            shutil.rmtree(old, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}.tmp-"))
        try:
            build(tmp)
            (tmp / ".complete").write_text("ok\n")
            if final.exists():               # a stale, incomplete dir from a killed builder
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final, True
    finally:
        lease.release()


def holder_age(lock: Path) -> str:
    """How long ago a lock file was touched, by this machine's clock (node clocks may differ a little)."""
    m = _mtime(Path(lock))
    return "never" if m is None else f"{max(0.0, time.time() - m / 1e9):.0f} s ago"


def dir_state(root: Path, key: str) -> tuple[str, dict]:
    """("complete" | "building" | "absent", holder) of root/key, without waiting or building."""
    if (root / key / ".complete").exists():
        return "complete", {}
    lock = root / f"{key}.lock"
    if lock.exists():
        holder = read_holder(lock)
        if not _pid_dead_here(holder):
            return "building", holder
    return "absent", {}


@contextmanager
def shared_lock(path: Path, what: str = "", timeout_s: float | None = None,
                on_wait: Callable[[dict], None] | None = None):
    """A Lease on `path` held for the `with` block (for caches on shared storage, instead of filelock)."""
    lease = acquire(Path(path), what=what, timeout_s=timeout_s, on_wait=on_wait)
    try:
        yield lease
    finally:
        lease.release()


@contextmanager
def run_lock(run_dir: Path, on_wait: Callable[[dict], None] | None = None, timeout_s: float | None = None):
    """Exclusive hold of one run directory for the `with` block.

    Two jobs on the same run (a requeued Slurm job beside its not-yet-dead predecessor, a duplicate
    in a sweep) must not append to one samples.jsonl at once: each would generate the same rows, and
    the torn-line repair of one could cut a line the other is still writing. The second job waits
    here (at most timeout_s, then LockBusy naming the holder); once it has the lock it sees every sample
    the first one wrote and generates only the rest. The lock is a Lease on run_dir/run.lock: a holder
    killed on any node is detected by its missing heartbeat.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    with shared_lock(run_dir / "run.lock", what=f"run {run_dir}", timeout_s=timeout_s, on_wait=on_wait) as lease:
        yield lease
