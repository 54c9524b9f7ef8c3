"""The one base class of errors a user can fix: the CLI prints their message as one line and exits 2."""


class PlcliError(Exception):
    """Bad input, a bad bundle, or a peer that refused us; the message is meant for the user."""
