"""Interrupting `thinkeys convert` (SIGINT, SIGTERM) leaves no half-written output, and keeps an old one intact.

Each case runs the real ``thinkeys convert`` CLI in a subprocess and signals it at a chosen phase.
To hit a phase every time (a tiny model converts in well under a second), the subprocess wraps one
``thinkeys.hf_io`` function so that, once the real function has done its work, it drops a marker
file and waits; the test sends the signal when the marker appears:

* ``reading``: the source weights are loaded, nothing is written yet;
* ``writing``: the weights are written into the temporary folder, config.json not yet;
* ``complete``: every file is in the temporary folder, only the rename into place is left.

After the signal, neither the destination nor any hidden ``.DST.tmp-*`` / ``.DST.old-*`` folder may
exist (or, with ``--force`` over an existing conversion, the old one must be untouched).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from robustness import record

#: phase -> the hf_io function after which the conversion pauses.
PHASES = {"reading": "load_state_dict", "writing": "save_state_dict", "complete": "copy_tokenizer_and_sidecars"}

DRIVER = textwrap.dedent(
    """
    import signal, sys, time
    from pathlib import Path
    from thinkeys import hf_io
    from thinkeys.cli import main

    # As in a terminal, whatever this test process inherited: a runner started with nohup or in the
    # background of a non-interactive shell ignores SIGINT, and Python then never raises KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    marker, function, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    real = getattr(hf_io, function)

    def paused(*args, **kwargs):
        result = real(*args, **kwargs)
        marker.write_text("paused")
        time.sleep(600)  # the test's signal arrives here
        return result

    setattr(hf_io, function, paused)
    sys.exit(main(argv))
    """
)


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(path.name.encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


CASES = [  # (signal, phase, --force over an existing conversion)
    (signal.SIGINT, "writing", False),
    (signal.SIGTERM, "reading", False),
    (signal.SIGTERM, "writing", False),
    (signal.SIGTERM, "complete", False),
    (signal.SIGINT, "complete", True),
    (signal.SIGTERM, "writing", True),
]


@pytest.mark.timeout(600)
def test_interrupted_conversion_leaves_nothing_half_written(checkpoints, tmp_path):
    src = checkpoints["llama"]
    runs = []
    # All cases at once: each subprocess spends most of its time importing torch and transformers.
    for i, (sig, phase, force) in enumerate(CASES):
        parent = tmp_path / f"case{i}"
        parent.mkdir()
        dst = parent / "thin"
        if force:
            subprocess.run([sys.executable, "-m", "thinkeys.cli", "convert", str(src), str(dst), "--rank", "8"],
                           check=True, capture_output=True, timeout=300)  # fmt: skip
        before = _tree_digest(dst) if force else None
        marker = parent / "paused"
        argv = ["convert", str(src), str(dst), "--rank", "8", *(["--force"] if force else [])]
        proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, str(marker), PHASES[phase], *argv],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        runs.append((sig, phase, force, parent, dst, marker, proc, before))

    outcomes = []
    try:
        for sig, phase, force, parent, dst, marker, proc, before in runs:
            deadline = time.monotonic() + 300
            while not marker.exists():
                assert proc.poll() is None, f"{phase}: the conversion ended before the pause: {proc.communicate()}"
                assert time.monotonic() < deadline, f"{phase}: never reached the pause"
                time.sleep(0.05)
            proc.send_signal(sig)
            _, stderr = proc.communicate(timeout=60)
            left = _leftovers(parent, dst.name)
            expected = ["thin"] if force else []
            assert left == expected, f"{sig.name} while {phase}: left {left}\n{stderr[-2000:]}"
            if force:
                assert _tree_digest(dst) == before, f"{sig.name} while {phase}: the old conversion changed"
            code = proc.returncode
            # SIGINT -> KeyboardInterrupt -> the CLI's 130; SIGTERM inside the write -> SystemExit(143);
            # SIGTERM before anything is written -> the default action (killed by the signal).
            assert code == {signal.SIGINT: 130, signal.SIGTERM: 143 if phase != "reading" else -signal.SIGTERM}[sig], (code, stderr[-2000:])
            outcomes.append({
                "signal": sig.name, "phase": phase, "over_existing": force, "exit_code": code,
                "left_behind": "the old conversion, unchanged" if force else "nothing",
            })  # fmt: skip
    finally:
        for *_, proc, _ in runs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    record("convert_interrupt", cases=outcomes)
