"""What every plcli command shares: the typer app, consoles, error reporting, progress and JSON output.

Every command reports bad input as one line on stderr with exit code 2; results
are rich tables for people and `--json` for scripts.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys

import typer
from typer.core import TyperCommand
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.segment import Segments
from rich.table import Table

from plcli.runtime.errors import PlcliError


def _quiet_libraries() -> None:
    # transformers draws its own tqdm bars and advice on stderr; plcli reports for itself.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


_quiet_libraries()

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="PrivateLoRA split inference: the decoder in the cloud, your text and adapter on the edge.",
)
console = Console()
err_console = Console(stderr=True)
UNBOUNDED = 1 << 20  # a width no table reaches: what print_table measures within


def _print_version(value: bool) -> None:
    """plcli's version and the formats it speaks: bundles and edges of another format or protocol are refused."""
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    from plcli.runtime.bundle import FORMAT_VERSION
    from plcli.runtime.wire import PROTOCOL_VERSION

    try:
        mine = version("plcli")
    except PackageNotFoundError:  # run from a source tree that was never installed
        mine = "unknown"
    console.print(f"plcli {mine} (bundle format {FORMAT_VERSION}, wire protocol {PROTOCOL_VERSION})", highlight=False)
    raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print plcli's version, bundle format and wire protocol, and exit."),
) -> None:
    pass  # the app's help is its own (typer.Typer(help=...)); this callback only adds --version


class UserError(PlcliError):
    """Bad command-line input noticed by the command itself."""


def seconds(flag: str, value: float, *, zero_turns_off: bool = False) -> float:
    """A wait given in seconds, checked before the command loads anything: finite, above 0 (or 0, where that turns
    the wait off), and at most a day (runtime.wire.MAX_TIMEOUT_S)."""
    from plcli.runtime.wire import MAX_TIMEOUT_S

    lowest = 0 if zero_turns_off else "more than 0"
    if not ((value >= 0 if zero_turns_off else value > 0) and value <= MAX_TIMEOUT_S):
        raise UserError(f"{flag} {value:g} is out of range: {lowest} to {MAX_TIMEOUT_S} seconds (24 hours)")
    return value


def check_utf8(text: str, what: str) -> None:
    """Python carries bytes of argv and stdin that are not UTF-8 as lone surrogates, which no tokenizer takes and no
    JSON file should hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{what} is not UTF-8 text (an invalid byte at character {e.start})") from None


MAX_THREADS = 1024  # far past any machine's cores, and within the C int ONNX Runtime and torch take a thread count in


def thread_count(value: int | None) -> int | None:
    """--threads, checked before the command loads anything (None: the command's default)."""
    if value is not None and not 1 <= value <= MAX_THREADS:
        raise UserError(f"--threads {value} is out of range: 1 to {MAX_THREADS}")
    return value


def cpu_list(text: str | None, option: str) -> frozenset[int] | None:
    """A --cpus list (taskset's form: 0, 0-3, 0,2,4-5), checked against the cores this process may use."""
    from plcli.runtime.cpus import parse_cpus

    if text is None:
        return None
    try:
        return parse_cpus(text, option)
    except ValueError as e:
        raise UserError(str(e)) from None


class KeepsWords(TyperCommand):
    """A command that keeps the words of its command line (`positionals` reads them): which option a positional
    argument follows can say what the user meant it for, and click keeps no order."""

    def parse_args(self, ctx, args):
        ctx.meta["words"] = list(args)
        return super().parse_args(ctx, args)


def positionals(ctx: typer.Context) -> list[tuple[str, str | None]]:
    """The positional words of a running `KeepsWords` command, in order, each with the last option before it."""
    flags = {name for p in ctx.command.params if getattr(p, "is_flag", False) for name in (*p.opts, *p.secondary_opts)}
    words, found, after, i = ctx.meta["words"], [], None, 0
    while i < len(words):
        word = words[i]
        if word == "--":
            found += [(w, after) for w in words[i + 1:]]
            break
        if word.startswith("-") and word != "-":
            after = word.split("=", 1)[0]
            i += 1 if "=" in word or after in flags else 2  # the option's value is not positional
            continue
        found.append((word, after))
        i += 1
    return found


def reports_errors(fn):
    """One clear line and a non-zero exit instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            stdout()  # every command writes its results there: with it closed, refused before any work
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except PlcliError as e:
            fail(str(e), 2)
        except BrokenPipeError:
            reader_gone()
        except OSError as e:
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            fail(f"{where}{e.strerror or e}", 2)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except Exception as e:
            if _caused_by_interrupt(e):  # a library that turned the Ctrl-C into its own error
                fail("interrupted", 130)
            if os.environ.get("PLCLI_DEBUG"):
                raise
            fail(f"internal error: {type(e).__name__}: {e} (set PLCLI_DEBUG=1 for a traceback)", 1)

    return wrapper


def reader_gone() -> None:
    """Stop quietly with exit code 1 where the reader of stdout has gone (`| head`), as rich does for what it prints:
    what is left in the buffer goes nowhere, instead of failing again as Python exits."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(1)


def _caused_by_interrupt(e: BaseException | None) -> bool:
    """Whether a KeyboardInterrupt is in `e`'s chain of causes: a Ctrl-C while onnxruntime's extension loads reaches
    the command as "ImportError: initialization failed", raised from it."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


reported: list[str] = []  # what `fail` said: main() says "interrupted" for a Ctrl-C that typer turned into exit 130


def fail(message: str, code: int):
    reported.append(message)
    err_console.print(f"[bold red]error:[/] {shown(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def printable(text: str, keep: str = "") -> str:
    """`text` with what a terminal would act on rather than show (escape sequences, lone surrogates) escaped,
    but for the characters in `keep`.

    Messages carry paths, a peer's words and generated text: none of it may steer the terminal or fail to encode.
    """
    return "".join(c if c.isprintable() or c in keep else c.encode("unicode_escape").decode("ascii") for c in text)


def shown(message) -> str:
    """A message as one line of plain text inside rich markup: printable, its brackets not taken for markup."""
    return escape(printable(" ".join(str(message).split())))


def print_table(table: Table) -> None:
    """`table` on stdout at its natural width, even past the terminal's (80 columns where none is attached): to fit,
    rich would cut cells to "…", and a number cut short reads as another number. A table that fits prints as ever."""
    natural = console.measure(table, options=console.options.update_width(UNBOUNDED)).maximum
    console.print(Segments(console.render(table, console.options.update_width(max(natural, console.width)))), crop=False)


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err_console, transient=True, disable=not err_console.is_terminal,
    )


def finite_json(obj):
    """`obj` with each NaN and infinity as None: JSON has neither, and strict parsers refuse the NaN and Infinity
    that Python's json writes for them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def stdout():
    """sys.stdout, or a one-line error where the command was started with it closed (`>&-`): Python has None there."""
    if sys.stdout is None:
        raise UserError("standard output is closed: there is nowhere to write the result")
    return sys.stdout


def print_json(obj) -> None:
    stdout().write(json.dumps(finite_json(obj), indent=2, default=str, allow_nan=False) + "\n")


HUGE_PAGES_HELP = ("Once the model is loaded, move its memory onto 2 MiB pages (Linux transparent huge pages, mode "
                   "madvise or always): fewer TLB misses while every token reads the weights.")
LOW_LATENCY_HELP = ("Keep this machine's idle cores polling instead of sleeping while this runs (Linux PM QoS, "
                    "/dev/cpu_dma_latency; needs root): faster round trips, at the cost of power.")


def status(message: str):
    """A spinner with `message` on a terminal; nothing where the output is not one."""
    return console.status(message, spinner="dots") if console.is_terminal else contextlib.nullcontext()
