"""The `plcli` command: a thin face over exporters/ and runtime/.

Each module below registers its commands on the shared typer app. They are imported inside `main`, where a Ctrl-C
while they load (typer, rich: a few tenths of a second) is one line like any other, not a traceback; `app` is
imported on first use (`from plcli.cli import app`).
"""

import os
import signal
import sys


def _register():
    from . import bundle_commands, demo  # noqa: F401  (registers commands)
    from . import estimate_commands  # noqa: F401  (registers `plcli estimate`)
    from . import tune_commands  # noqa: F401  (registers `plcli tune`, `plcli export-peft`)
    from . import serve_commands  # noqa: F401  (registers `plcli serve-cloud`, `plcli run-edge`)
    from . import keys_commands  # noqa: F401  (registers `plcli keys generate`)
    from . import bench_commands  # noqa: F401  (registers `plcli bench decode`, `plcli bench tune`)
    from .app import app

    return app


def __getattr__(name: str):
    if name == "app":
        return _register()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _interrupted() -> None:
    sys.stderr.write("error: interrupted\n")
    sys.exit(130)


def _stdout_failed(error: OSError) -> None:
    from .app import reader_gone

    if isinstance(error, BrokenPipeError):
        reader_gone()
    # What is left in the buffer would fail again as Python exits, with a traceback of its own.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.stderr.write(f"error: cannot write to standard output: {error.strerror or error}\n")
    sys.exit(2)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main():
    """Run the app; usage errors too become one line and exit code 2."""
    # A `kill` (SIGTERM) or a closed terminal (SIGHUP) ends a command as Ctrl-C does, so that it does what it does
    # then: tune saves its last step, a half-written output is removed. Python's default was to die on the spot.
    # (serve-cloud sets its own: it stops serving and frees its sessions.)
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _raise_interrupt)
    try:
        app = _register()
        import typer

        try:  # typer >= 0.20 carries its own copy of click
            from typer._click import exceptions as click_exceptions
        except ImportError:
            from click import exceptions as click_exceptions

        from .app import err_console, reported, shown
    except KeyboardInterrupt:
        _interrupted()

    reported.clear()  # this run's (the app may have run before in this process: tests)
    try:
        code = app(standalone_mode=False)
    except click_exceptions.NoArgsIsHelpError:
        sys.exit(0)  # typer has already printed the help
    except click_exceptions.UsageError as e:
        where = f" (see `{e.ctx.command_path} --help`)" if e.ctx else ""
        err_console.print(f"[bold red]error:[/] {shown(e.format_message() + where)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        _interrupted()  # before a command's own handling (reports_errors) began, or after it ended
    except typer.Exit as e:
        code = e.exit_code
    except OSError as e:  # help or --version that standard output cannot take (a full disk, a closed pipe)
        _stdout_failed(e)
    if code == 130 and not reported:
        _interrupted()  # typer's exit code for a Ctrl-C outside the command's own handling, which said nothing
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
