"""The `lossx` group: every error as one line with its exit code, interruptions, and code a
command imports (a user's model) kept from ending the process or writing into lossx's output."""

import contextlib
import io
import os
import signal
import sys
from pathlib import Path

import click

from lossx import __version__
from lossx.errors import LossxError, first_line
from lossx.files import write_atomically

INTERRUPTED, TERMINATED = 130, 143  # the shell's codes: 128 + SIGINT, 128 + SIGTERM


USER_EXIT = 2  # a user's code asked to end the process in the middle of a command


_signals: list[int] = []  # the signals this command received


def _on_signal(signum, frame) -> None:
    """Ctrl-C and SIGTERM both raise KeyboardInterrupt where the command is, so that it cleans
    up; which one came is remembered, since a library may wrap the exception in its own."""
    _signals.append(signum)
    raise KeyboardInterrupt


def _exit_with(message: str, exit_code: int) -> click.ClickException:
    error = click.ClickException(message)
    error.exit_code = exit_code
    return error


class _ProcessExit(BaseException):
    """os._exit called by code lossx runs (a user's model), turned into an exception."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@contextlib.contextmanager
def _user_code_contained():
    """While a command runs, code it imports or calls (a user's model module) can neither end
    the process nor write into lossx's output: print() and anything else written to stdout go
    to stderr, stdout carrying lossx's own output alone (`echo`), and os._exit raises
    _ProcessExit in this process (a forked child still exits as it asks); SystemExit is caught
    by `_LossxGroup.invoke`. What no process can intercept (a C library's exit(), a signal
    that kills) is beyond this (docs/security.md)."""
    global _stdout
    pid, real_exit = os.getpid(), os._exit

    def contained_exit(code: int) -> None:
        if os.getpid() != pid:
            real_exit(code)
        raise _ProcessExit(code)

    sys.stdout.flush()
    saved_fd = None
    try:
        saved_fd = os.dup(sys.stdout.fileno())  # a real stdout: redirect the descriptor too
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        _stdout = sys.stdout  # click's CliRunner: no descriptor to redirect
    if saved_fd is not None:
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        _stdout = io.TextIOWrapper(
            io.FileIO(saved_fd, "w", closefd=False),
            encoding=sys.stdout.encoding,
            errors=sys.stdout.errors,
            write_through=True,
        )
    os._exit = contained_exit
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        os._exit = real_exit
        _stdout.flush()
        if saved_fd is not None:
            sys.stdout.flush()
            os.dup2(saved_fd, sys.stdout.fileno())
            os.close(saved_fd)
        _stdout = None


_stdout = None  # where lossx's own output goes while a command runs (_user_code_contained)


def echo(message: str = "", err: bool = False, nl: bool = True) -> None:
    """click.echo to stdout, which while a command runs carries lossx's output alone (or to
    stderr with `err`)."""
    click.echo(message, file=None if err else _stdout or sys.stdout, err=err, nl=nl)


class _LossxGroup(click.Group):
    """Every error as one line, `Error: ...` on stderr, with its documented exit code: lossx's
    own errors, click's usage errors (with a pointer to --help instead of the usage text),
    interruptions (130 for Ctrl-C, 143 for SIGTERM), and an exit a user's code asked for in
    the middle of a command (2)."""

    def invoke(self, ctx: click.Context):
        try:
            with _user_code_contained():
                return super().invoke(ctx)
        except BaseException as e:
            if _signals or isinstance(e, KeyboardInterrupt):
                if signal.SIGTERM in _signals:
                    raise _exit_with("terminated (SIGTERM)", TERMINATED) from None
                raise _exit_with("interrupted", INTERRUPTED) from None
            if isinstance(e, LossxError):
                raise _exit_with(str(e), e.exit_code) from None
            if isinstance(e, SystemExit | _ProcessExit):
                how = "os._exit" if isinstance(e, _ProcessExit) else "sys.exit"
                raise _exit_with(
                    f"code lossx {ctx.invoked_subcommand} ran (your model's module) called "
                    f"{how}({e.code!r}); lossx stopped there, and what it writes appears whole "
                    "or not at all",
                    USER_EXIT,
                ) from None
            raise

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        _signals.clear()
        previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            code = super().main(
                args, prog_name or "lossx", complete_var, standalone_mode=False, **extra
            )
        except click.exceptions.NoArgsIsHelpError as e:
            e.show()
            code = e.exit_code
        except click.ClickException as e:
            message = first_line(click.ClickException(e.format_message()))
            if isinstance(e, click.UsageError) and e.ctx is not None:
                message += f" (see {e.ctx.command_path} --help)"
            click.echo(f"Error: {message}", err=True)
            code = e.exit_code
        except click.exceptions.Abort:  # Ctrl-C while click itself was parsing
            click.echo("Error: interrupted", err=True)
            code = INTERRUPTED
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


@click.group(cls=_LossxGroup)
@click.version_option(__version__, prog_name="lossx")
def main() -> None:
    """Export a CIFAR-10 model and its losses to ONNX, evaluate them, prove parity."""


def write_picture(path: Path, png: bytes, what: str) -> None:
    """Write a picture atomically and say so on stderr (stdout carries lossx's results)."""
    write_atomically(path, lambda f: f.write(png))
    click.echo(f"wrote {path}: {what}", err=True)


def write_text(path: str, text: str) -> None:
    if path == "-":
        echo(text, nl=False)
    else:
        write_atomically(Path(path), lambda f: f.write(text.encode()))
