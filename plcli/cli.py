"""The `plcli` command: a thin face over exporters/ and runtime/.

Each module below registers its commands on the shared typer app.
"""

from . import bundle_commands, demo  # noqa: F401  (registers commands)
from . import estimate_commands  # noqa: F401  (registers `plcli estimate`)
from . import tune_commands  # noqa: F401  (registers `plcli tune`, `plcli export-peft`)
from . import serve_commands  # noqa: F401  (registers `plcli serve-cloud`, `plcli run-edge`)
from . import keys_commands  # noqa: F401  (registers `plcli keys generate`)
from . import bench_commands  # noqa: F401  (registers `plcli bench decode`, `plcli bench tune`)
from .app import app


def main():
    """Run the app; usage errors too become one line and exit code 2."""
    import sys

    import typer

    try:  # typer >= 0.20 carries its own copy of click
        from typer._click import exceptions as click_exceptions
    except ImportError:
        from click import exceptions as click_exceptions

    from .app import err_console, shown

    try:
        code = app(standalone_mode=False)
    except click_exceptions.NoArgsIsHelpError:
        sys.exit(0)  # typer has already printed the help
    except click_exceptions.UsageError as e:
        where = f" (see `{e.ctx.command_path} --help`)" if e.ctx else ""
        err_console.print(f"[bold red]error:[/] {shown(e.format_message() + where)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
