"""One pipeline stage as a child process: its output streamed into a log, SIGTERM forwarded to
it, and its exit code polyinr's own (polyinr.core.errors), even when DVC or a launcher ran it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

from polyinr.commands.pipeline import env
from polyinr.core import errors


class StageFailed(RuntimeError):
    """A DVC stage that exited non-zero; the message ends with its last output lines."""

    def __init__(self, stage: str, returncode: int, tail: list[str]):
        self.stage, self.returncode = stage, returncode
        super().__init__(f"stage {stage} exited with {returncode}:\n" + "\n".join(tail))


class _ForwardSigterm:
    """While a stage runs, SIGTERM (pre-emption, `stack.sh down`, a pod's end) goes to the
    stage's process group: training checkpoints and exits 143. Once its output has ended,
    `chain` hands the signal to Prefect's handler, which ends the flow run Crashed (or
    Cancelled when Prefect itself asked)."""

    def __init__(self, pgid: int):
        self.pgid, self.received, self.previous = pgid, False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGTERM)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    def chain(self) -> None:
        if callable(self.previous):
            self.previous(signal.SIGTERM, None)  # Prefect's: raises TerminationSignal
        raise SystemExit(128 + signal.SIGTERM)


def stream(cmd: str | list[str], logger, cwd: Path) -> tuple[int, list[str]]:
    """Run a command (a shell line when a str) in `cwd`, its own process group, with its
    output in the Prefect log; returns the exit status and every non-empty output line.

    The status is polyinr's own when a polyinr command ran: `dvc repro` (and a launcher such
    as torchrun) exit with codes of their own, so polyinr also writes its code to
    $POLYINR_EXIT_FILE, and that code wins when the command failed."""
    logger.info("$ %s", cmd if isinstance(cmd, str) else " ".join(cmd))
    lines = []
    with (
        tempfile.TemporaryDirectory(prefix="polyinr-exit-") as tmp,
        subprocess.Popen(
            cmd,
            cwd=cwd,
            env={**env(), errors.EXIT_FILE: str(Path(tmp) / "code")},
            shell=isinstance(cmd, str),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        ) as proc,
        _ForwardSigterm(proc.pid) as sigterm,
    ):
        # Until every process holding the pipe (DVC, torchrun, training ranks) has exited.
        for line in proc.stdout:
            if line := line.rstrip():
                lines.append(line)
                logger.info(line)
        code = proc.wait()
        recorded = Path(tmp) / "code"
        if code != 0 and recorded.is_file():
            code = int(recorded.read_text())
    if sigterm.received:
        logger.warning("SIGTERM: %s stopped (exit %s)", cmd, code)
        sigterm.chain()
    return code, lines


def checkpoints(stage: str, events: list[dict]) -> dict:
    """What training's event log says about checkpoints: the one it resumed from, the ones it
    wrote."""
    result = {"stage": stage, "ran": True, "resumed_from": None, "checkpoints": []}
    for event in events:
        if event["event"] == "run_started" and event["resumed_from"]:
            result["resumed_from"] = event["resumed_from"]
            result["resumed_nimg"] = event["nimg"]
        elif event["event"] == "checkpoint":
            result["checkpoints"].append(event["uri"])
    return result
