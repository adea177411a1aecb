"""Resumable training state for the methods that train (Reasoning-QAT, SliderQuant).

A preempted Slurm job or a killed run must not lose hours of training: a method saves its state to a
`StateFile` as it goes (atomically: a kill mid-write leaves the previous state) and, when started
again with the same key, carries on from there and reaches the same result as an uninterrupted run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from harness.store import save_torch_atomic


class TrainingStopped(RuntimeError):
    """Training left early on purpose (a method's `stop_at`), its state saved for a resume."""


class StateFile:
    """One training phase's resumable state: written atomically, read back only if its key matches."""

    def __init__(self, path: Optional[Path], key: dict):
        self.path = path
        self.key_json = json.dumps(key, sort_keys=True, default=str)

    def load(self) -> Optional[dict]:
        if self.path is None or not self.path.is_file():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        return state if state.get("key_json") == self.key_json else None

    def save(self, state: dict) -> None:
        if self.path is not None:
            save_torch_atomic(self.path, {**state, "key_json": self.key_json})

    def remove(self) -> None:
        if self.path is not None and self.path.is_file():
            self.path.unlink()


__all__ = ["StateFile", "TrainingStopped"]
