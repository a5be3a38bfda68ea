"""The fine-tuning work folder: resumable state, the training log, and clean interruption.

A run keeps everything it needs to continue in ``WORK`` (default: ``.<DST name>.finetune`` beside
DST)::

    WORK/config.json    the run's settings (a resumed run must use the same ones)
    WORK/state.pt       trainable tensors, optimizer state, position in the schedule (written atomically)
    WORK/log.jsonl      one JSON object per logged step (appended; survives interruptions)

``state.pt`` is written to a temporary file and renamed over the old one, so a kill at any moment
leaves either the previous or the new state, never a torn one. DST itself is only written at the
very end, through :func:`thinkeys.hf_io.atomic_directory` (via ``save_thin_model``).

SIGTERM is turned into ``KeyboardInterrupt`` while training runs (:func:`interrupts_raise`), so
``kill`` and Ctrl-C take the same path: the ``with`` blocks unwind, the temporary DST folder (if
the final save had started) is removed, and the last saved state stays for ``--resume``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from thinkeys.checkpoint import ThinKeyError

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"


class WorkDir:
    """A fine-tuning run's folder (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def state_path(self) -> Path:
        return self.path / STATE_FILE

    @property
    def log_path(self) -> Path:
        return self.path / LOG_FILE

    def has_state(self) -> bool:
        return self.state_path.is_file()

    def start(self, settings: dict[str, Any], *, resume: bool) -> bool:
        """Prepare the folder for a run with ``settings``; returns True if there is state to resume from.

        An existing folder from a run with other settings is refused (it would mix two runs), unless
        ``resume`` is False, in which case its state and log are discarded.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        config_path = self.path / CONFIG_FILE
        if config_path.is_file() and self.has_state():
            previous = json.loads(config_path.read_text())
            if resume and previous != settings:
                changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
                raise ThinKeyError(
                    f"{self.path}: holds a run with different settings ({', '.join(changed)}); "
                    "resume with the same settings, pass --restart to discard it, or choose another --work-dir"
                )
            if resume:
                return True
        for name in (STATE_FILE, LOG_FILE):
            (self.path / name).unlink(missing_ok=True)
        _atomic_write_text(config_path, json.dumps(settings, indent=2, sort_keys=True) + "\n")
        return False

    def save_state(self, state: dict[str, Any]) -> None:
        tmp = self.path / f".{STATE_FILE}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.state_path)

    def load_state(self) -> dict[str, Any]:
        return torch.load(self.state_path, map_location="cpu", weights_only=False)

    def log(self, record: dict[str, Any]) -> None:
        with self.log_path.open("a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def read_log(self) -> list[dict[str, Any]]:
        if not self.log_path.is_file():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """While inside, SIGTERM raises ``KeyboardInterrupt`` like SIGINT does (restored on exit)."""

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
