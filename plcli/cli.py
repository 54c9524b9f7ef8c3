"""The `plcli` command: a thin face over exporters/ and runtime/.

Each module below registers its commands on the shared typer app.
"""

from . import bundle_commands, demo  # noqa: F401  (registers commands)
from .app import app


def main():
    app()


if __name__ == "__main__":
    main()
