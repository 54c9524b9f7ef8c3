"""`plcli keys generate`: the CURVE key pairs that encrypt and authenticate serve-cloud's traffic."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, console, print_json, reports_errors, shown

keys_app = typer.Typer(no_args_is_help=True, help="CURVE key pairs for serve-cloud, run-edge and tune.")
app.add_typer(keys_app, name="keys")


@keys_app.command("generate")
@reports_errors
def generate(
    path: Path = typer.Argument(..., metavar="PATH/NAME", help="Writes PATH/NAME.key (public) and PATH/NAME.key_secret."),
    force: bool = typer.Option(False, "--force", help="Replace an existing pair of that name."),
    as_json: bool = typer.Option(False, "--json", help="Print the paths and the public key as JSON."),
):
    """Write a CURVE key pair: the public NAME.key to hand out, the secret NAME.key_secret (mode 0600) to keep."""
    from plcli.runtime.secure import generate_key_pair

    public_file, secret_file, public_key = generate_key_pair(path, force=force)
    if as_json:
        print_json({"public_key_file": str(public_file), "secret_key_file": str(secret_file), "public_key": public_key})
        return
    console.print(f"wrote [bold]{shown(public_file)}[/] (public: copy it into the cloud's --authorized-keys directory, or give it "
                  f"to edges as --server-key) and [bold]{shown(secret_file)}[/] (secret, mode 0600: it stays on this machine)",
                  highlight=False)
