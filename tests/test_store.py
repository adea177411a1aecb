import json
import multiprocessing as mp
import time

from harness.store import SampleStore, cached_dir, stable_hash


def rec(i, j=0):
    return {"id": f"e{i}", "sample": j, "completion": "x" * i, "correct": i % 2 == 0}


def test_append_and_reload(tmp_path):
    s = SampleStore(tmp_path / "samples.jsonl")
    s.append([rec(1), rec(2)])
    s.append([rec(3)])
    again = SampleStore(tmp_path / "samples.jsonl")
    assert [r["id"] for r in again.records] == ["e1", "e2", "e3"]
    assert again.done() == {("e1", 0), ("e2", 0), ("e3", 0)}


def test_torn_last_line_is_cut_back(tmp_path):
    p = tmp_path / "samples.jsonl"
    p.write_text(json.dumps(rec(1)) + "\n" + json.dumps(rec(2)) + "\n" + '{"id": "e3", "sam')
    s = SampleStore(p)
    assert [r["id"] for r in s.records] == ["e1", "e2"]
    s.append([rec(3)])
    lines = p.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["e1", "e2", "e3"]


def test_duplicate_records_are_read_once(tmp_path):
    p = tmp_path / "samples.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in [rec(1), rec(1), rec(1, 1)]))
    assert len(SampleStore(p).records) == 2


def test_stable_hash_ignores_key_order():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


def _build_in_process(root, key, log_path):
    def build(tmp):
        with open(log_path, "a") as f:
            f.write("built\n")
        time.sleep(1.0)
        (tmp / "weights.bin").write_bytes(b"q" * 1000)
    path, built = cached_dir(root, key, build)
    return str(path), built


def _worker(root, key, log_path, q):
    q.put(_build_in_process(root, key, log_path))


def test_two_processes_build_once_and_share(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    log = tmp_path / "log.txt"
    procs = [ctx.Process(target=_worker, args=(tmp_path / "cache", "k1", str(log), q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    results = [q.get(timeout=5) for _ in procs]
    assert log.read_text().count("built") == 1
    assert results[0][0] == results[1][0]
    assert sorted(r[1] for r in results) == [False, True]
    assert (tmp_path / "cache" / "k1" / "weights.bin").read_bytes() == b"q" * 1000


def test_failed_build_leaves_nothing(tmp_path):
    def boom(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("killed")
    try:
        cached_dir(tmp_path, "k", boom)
    except RuntimeError:
        pass
    assert not (tmp_path / "k").exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
