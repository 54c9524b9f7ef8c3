"""What every command that talks to a cloud shares: --connect and failover over its list, CURVE keys, the wire dtype."""

from __future__ import annotations

from pathlib import Path

from .app import UserError, err_console, shown

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"  # loopback: serving beyond this machine is a deliberate choice
WIRE_DTYPE_HELP = "Activations on the wire: float32 (exact) or float16 (half the bytes); the same on both sides."
CURVE_SECRET_HELP = "This edge's NAME.key_secret (`plcli keys generate`): encrypt and authenticate; needs --server-key."
SERVER_KEY_HELP = "The cloud's public NAME.key: only a cloud holding its secret is answered; needs --curve-secret."


CONNECT_HELP = ("The cloud's ZeroMQ endpoint; repeat it (or separate with commas) to name clouds to fail over to, "
                "in order. Default " + DEFAULT_ENDPOINT + ".")
RECONNECT_HELP = "Seconds to spend reopening a lost session on the clouds of --connect (0: no failover)."


def check_wire_dtype(value: str) -> str:
    """--wire-dtype, checked before the command loads anything."""
    from plcli.runtime.wire import WIRE_DTYPES

    if value not in WIRE_DTYPES:
        raise UserError(f"--wire-dtype must be {' or '.join(WIRE_DTYPES)}, not {value!r}")
    return value


def cloud_urls(connect: list[str] | None) -> list[str]:
    """The endpoints of --connect, in order, each checked before anything loads or connects."""
    from plcli.runtime.wire import check_endpoint

    urls = [u.strip() for value in (connect or [DEFAULT_ENDPOINT]) for u in value.split(",") if u.strip()]
    if not urls:
        raise UserError("--connect names no endpoint")
    for url in urls:
        try:
            check_endpoint(url, bind=False)
        except ValueError as e:
            raise UserError(f"--connect {e}") from None
    return urls


def make_failover(urls: list[str], open_session, *, timeout: float, reconnect_timeout: float,
                  carrying_on: str = "replaying this session's tokens"):
    """A `Failover` over the URLs of --connect (see cloud_urls), reporting losses and reconnects (and then
    `carrying_on`) on stderr."""
    from plcli.runtime.failover import Failover

    def report(e: dict) -> None:
        if e["event"] == "lost":
            err_console.print(f"[yellow]lost the cloud at {shown(e['url'])}[/] ({shown(e['message'])}); reconnecting for up to "
                              f"{e['left_s']:g} s", highlight=False, soft_wrap=True)
        elif e["event"] == "reconnected":
            err_console.print(f"reconnected to {shown(e['url'])}; {carrying_on}", highlight=False, soft_wrap=True)
        elif e["event"] == "unreachable":
            err_console.print(f"[yellow]{shown(e['url'])}[/]: {shown(e['message'])}; trying the next cloud", highlight=False, soft_wrap=True)

    return Failover(urls, open_session, timeout=timeout, reconnect_timeout=reconnect_timeout, on_event=report)


def client_keys(curve_secret: Path | None, server_key: Path | None):
    """The edge's CURVE keys from --curve-secret and --server-key (both or neither); None for a plain connection."""
    from plcli.runtime.secure import ClientKeys

    if (curve_secret is None) != (server_key is None):
        raise UserError("--curve-secret and --server-key go together: the edge's own secret key and the cloud's public key")
    return None if curve_secret is None else ClientKeys.load(curve_secret, server_key)
