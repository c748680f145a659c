"""What a study shows on the terminal, and where everything else goes.

A study's terminal shows its own progress (stage lines, the workers' ``[profile]``/``[quality]``
lines), warnings that need the user, and the closing table. Ray, Tune, Train, MLflow and Optuna
write a great deal more: configuration boxes, "View detailed results here" lines, C++ core-worker
messages, deprecation and authentication warnings, the tracebacks of Ray's own background threads.
``Console.start`` sends file descriptors 1 and 2 of the process (and so of every process Ray starts
from it) through a pipe: every line lands in ``study.log`` in the output folder, and only the
workers' progress lines reach the terminal, without Ray's ``(RayTrainWorker pid=...)`` prefix.
The study's own messages (``say``/``warn``/``error``) go straight to the terminal and the log.
``verbose=True`` leaves the descriptors alone: everything is shown, as without a console.
"""
from __future__ import annotations

import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

# a worker line as Ray prints it on the driver: colour codes, "(Actor pid=N[, ip=...])", the text
_RAY_PREFIX = re.compile(r"^(?:\x1b\[\d+m)*\((?P<who>[^)]*pid=\d+[^)]*)\)(?:\x1b\[0m)?\s?")
PROGRESS_MARKERS = ("[profile]", "[quality]", "[progress]")


def progress_line(line: str) -> str | None:
    """The study's own progress in a line of process output (prefix stripped), or None."""
    text = _RAY_PREFIX.sub("", line, count=1)
    stripped = text.lstrip()
    return "  " + stripped if stripped.startswith(PROGRESS_MARKERS) else None


class Console:
    def __init__(self, log_path: Path, verbose: bool = False):
        self.log_path, self.verbose = Path(log_path), verbose
        self._log: TextIO | None = None
        self._out: TextIO = sys.stdout
        self._err: TextIO = sys.stderr
        self._saved: tuple[int, int] | None = None
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the study's own messages

    def _write(self, stream: TextIO, text: str) -> None:
        with self._lock:
            stream.write(text + "\n")
            stream.flush()
            if self._log is not None:
                self._log.write(text + "\n")
                self._log.flush()

    def say(self, text: str = "") -> None:
        self._write(self._out, text)

    def warn(self, text: str) -> None:
        self._write(self._err, text if text.startswith("warning") else f"warning: {text}")

    def error(self, text: str) -> None:
        self._write(self._err, text)

    def log_only(self, text: str) -> None:
        with self._lock:
            if self._log is not None:
                self._log.write(text + "\n")
                self._log.flush()

    # ------------------------------------------------------------------ everything else

    def start(self) -> "Console":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a", buffering=1, encoding="utf-8", errors="replace")
        self._log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: {' '.join(sys.argv)}\n")
        if self.verbose:
            return self
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = (os.dup(1), os.dup(2))
        self._out = os.fdopen(os.dup(self._saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")
        self._err = os.fdopen(os.dup(self._saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
        read_end, write_end = os.pipe()
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(write_end)
        self._reader = threading.Thread(target=self._pump, args=(read_end,), name="console", daemon=True)
        self._reader.start()
        return self

    def _pump(self, fd: int) -> None:
        """Every line to the log; progress lines to the terminal too. Never stops reading before EOF
        (a writer blocked on a full pipe would hang the study)."""
        with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as pipe:
            for line in pipe:
                try:
                    line = line.rstrip("\n")
                    self.log_only(line)
                    shown = progress_line(line)
                    if shown is not None:
                        with self._lock:
                            self._out.write(shown + "\n")
                            self._out.flush()
                except Exception:  # noqa: BLE001 - a broken terminal must not stop the draining
                    pass

    def stop(self) -> None:
        """Put the descriptors back and let the pump drain what is left (processes Ray started
        may still hold the pipe: the pump is a daemon and is not waited for long)."""
        if self._saved is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(self._saved[0], 1)
            os.dup2(self._saved[1], 2)
            os.close(self._saved[0])
            os.close(self._saved[1])
            self._saved = None
            if self._reader is not None:
                self._reader.join(timeout=2)
        if self._log is not None:
            with self._lock:
                self._log.close()
                self._log = None
