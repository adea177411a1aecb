

class PeakRSS:
    """Peak resident set size of this process while the block runs, sampled every 5 ms by a thread:
    `with PeakRSS() as m: ...` then m.base (bytes on entry) and m.peak (bytes, at least base)."""

    def __enter__(self) -> "PeakRSS":
        import threading
        self.base = self.peak = _rss()
        self._done = threading.Event()

        def sample():
            while not self._done.wait(0.005):
                self.peak = max(self.peak, _rss())
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def above_mb(self) -> float:
        return (self.peak - self.base) / 2 ** 20


def _rss() -> int:
    import os
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
