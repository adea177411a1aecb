"""Plain files that never lose work: streamed samples.jsonl, atomic JSON, a locked checkpoint cache."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

from filelock import FileLock, Timeout


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


def cached_dir(root: Path, key: str, build: Callable[[Path], None], on_wait: Callable[[], None] | None = None) -> tuple[Path, bool]:
    """Return root/key, building it with `build(tmp_dir)` if absent. (path, built_here).

    A file lock makes concurrent jobs wait for the first builder instead of repeating its work;
    the build happens in a temp dir renamed into place, so nobody ever sees half a directory.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    if (final / ".complete").exists():
        return final, False
    lock = FileLock(str(root / f"{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Exception:
        if on_wait:
            on_wait()
        lock.acquire()
    try:
        if (final / ".complete").exists():
            return final, False
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
        lock.release()


@contextmanager
def run_lock(run_dir: Path, on_wait: Callable[[], None] | None = None):
    """Exclusive hold of one run directory for the `with` block (a killed holder releases it at once).

    Two jobs on the same run (a requeued Slurm job beside its not-yet-dead predecessor, a duplicate
    in a sweep) must not append to one samples.jsonl at once: each would generate the same rows, and
    the torn-line repair of one could cut a line the other is still writing. The second job waits
    here; once it has the lock it sees every sample the first one wrote and generates only the rest.
    The lock is an OS file lock (flock) on run_dir/run.lock.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / "run.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if on_wait:
            on_wait()
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
