"""Progress on stderr: a bar on a terminal, lines every PROGRESS_SECONDS elsewhere; epoch lines
and their JSON log."""

import json
import sys
import time
from pathlib import Path

import click

from lossx.cli.app import echo
from lossx.errors import LossxError


class EpochProgress:
    """Progress per epoch on stderr, then one line per epoch on stdout, and JSON lines to the
    --log-json file (or to stdout, `-`, the epoch lines then going to stderr)."""

    def __init__(self, log_json: Path | None) -> None:
        self.log_json = log_json
        self.log = None
        self.bar = None
        self.done = 0

    def __enter__(self) -> "EpochProgress":
        if self.log_json and str(self.log_json) != "-":
            try:
                self.log = self.log_json.open("w", encoding="utf-8")
            except OSError as e:
                raise LossxError(f"cannot write {self.log_json}: {e.strerror}") from None
        return self

    def __exit__(self, *exc) -> None:
        self._close_bar()
        if self.log:
            self.log.close()

    def batch(self, epoch: int, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = progress_bar(total, f"epoch {epoch}", "images").__enter__()
            self.done = 0
        self.bar.update(done - self.done)
        self.done = done

    def epoch(self, result) -> None:
        self._close_bar()
        to_stdout = str(self.log_json) == "-"
        echo(result.to_line(), err=to_stdout)
        line = json.dumps(result.to_dict())
        if to_stdout:
            echo(line)
        elif self.log:
            self.log.write(line + "\n")
            self.log.flush()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def progress_bar(total: int, label: str, unit: str = "images"):
    """Progress on stderr: a bar on a terminal; elsewhere (a CI log, a file) a line every
    PROGRESS_SECONDS, so that a long command shows it is alive."""
    if sys.stderr.isatty():
        return click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True)
    return ProgressLines(total, label, unit)


PROGRESS_SECONDS = 10.0


class ProgressLines:
    """click.progressbar's interface, writing `label: done/total unit (percent), rate` lines to
    stderr at most every PROGRESS_SECONDS, and once at the end."""

    def __init__(self, total: int, label: str, unit: str) -> None:
        self.total, self.label, self.unit = total, label, unit
        self.done = 0

    def __enter__(self) -> "ProgressLines":
        self.started = self.last = time.monotonic()
        return self

    def update(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS:
            self.last = now
            self._line(now)

    def __exit__(self, *exc) -> None:
        if exc[0] is None and self.last > self.started:  # it has printed: say it finished
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        rate = self.done / max(now - self.started, 1e-9)
        share = self.done / self.total if self.total else 1.0
        click.echo(f"{self.label}: {self.done:,}/{self.total:,} {self.unit} ({share:.0%}), "
                   f"{rate:,.0f} {self.unit}/s", err=True)  # fmt: skip
