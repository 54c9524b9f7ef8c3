"""Failover by replay: when the cloud is lost, open a session on the next one and carry on.

The cloud keeps nothing the edge cannot rebuild. A generate session's KV cache
is a function of the tokens fed so far, which the edge keeps (`Conversation`),
so a new session replays them as one prefill and generation continues at the
same position. A tune pass keeps nothing across steps, so the interrupted step
is simply done again on the new session; M only changes after a step's last
reply, so nothing is applied twice.

Only losses are recovered: a silence (the cloud died, or the network did), a
closed connection, or a cloud that no longer knows the session (it restarted,
or freed it as idle). A refusal (mismatched bundles, limits, a malformed
request) would be refused again, so it is reported as it is.

A reopened session counts as recovered only once it has done the work it was
opened for (the caller says so with `settled`): a cloud that opens sessions and
loses each of them at once, as a broken or hostile one can, gets the rest of
the same --reconnect-timeout and backoff, not a fresh one after each open,
which would retry forever.
"""

from __future__ import annotations

import time
from typing import Callable, Generic, TypeVar

from .train_link import LinkError

RECOVERABLE_CODES = frozenset({"timeout", "closed", "unknown_session"})
FIRST_DELAY_S, MAX_DELAY_S = 0.25, 4.0

Session = TypeVar("Session")


def is_loss(error: BaseException) -> bool:
    """Whether `error` means the session is gone (worth reopening elsewhere) rather than refused."""
    return isinstance(error, LinkError) and getattr(error, "code", None) in RECOVERABLE_CODES


class Failover(Generic[Session]):
    """Opens sessions on a list of clouds: the first that answers, and after a loss the next, until a deadline.

    `open_session(url, timeout)` opens a session (a `RemoteCloudSession` or
    `RemoteTrainLink`) or raises a `LinkError`. After a loss each URL is tried
    in turn, starting with the one after the lost cloud's, waiting a capped
    exponentially growing delay between tries, for at most `reconnect_timeout`
    seconds; 0 turns failover off.
    """

    def __init__(self, urls: list[str], open_session: Callable[[str, float], Session], *, timeout: float,
                 reconnect_timeout: float, on_event: Callable[[dict], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
        if not urls:
            raise ValueError("no cloud to connect to")
        if reconnect_timeout < 0:
            raise ValueError("the reconnect timeout must be >= 0")
        self.urls, self.open_session, self.timeout = list(urls), open_session, timeout
        self.reconnect_timeout = reconnect_timeout
        self.on_event = on_event or (lambda event: None)
        self.sleep, self.clock = sleep, clock
        self.current = 0  # index of the URL of the session last opened
        self.reconnects = 0
        # While the session `recover` last returned has not `settled`: when its reconnecting must end, and the wait
        # before the next try.
        self._deadline: float | None = None
        self._delay = FIRST_DELAY_S

    @property
    def url(self) -> str:
        return self.urls[self.current]

    def open(self) -> Session:
        """The first session: each URL once, in order; the last error if none takes it."""
        error: LinkError | None = None
        for i, url in enumerate(self.urls):
            try:
                session = self.open_session(url, self.timeout)
            except LinkError as e:
                error = e
                if len(self.urls) > 1:
                    self.on_event({"event": "unreachable", "url": url, "message": str(e)})
                continue
            self.current = i
            return session
        raise error

    def recover(self, error: LinkError) -> Session:
        """A new session after `error` lost the old one; re-raises `error` if it was no loss or failover is off.

        Until the caller calls `settled`, the session returned is on trial: if it is lost too, this goes on within
        the same --reconnect-timeout, after the next backoff delay.
        """
        if not is_loss(error) or not self.reconnect_timeout:
            raise error
        lost = self.url
        on_trial = self._deadline is not None  # the session the last recover opened was lost before it did anything
        if not on_trial:
            self._deadline, self._delay = self.clock() + self.reconnect_timeout, FIRST_DELAY_S
        deadline = self._deadline
        self.on_event({"event": "lost", "url": lost, "message": str(error),
                       "left_s": max(0.0, round(deadline - self.clock(), 1))})
        attempt, last = 0, error
        if on_trial:
            self._backoff(deadline)
        while True:
            left = deadline - self.clock()
            if left <= 0:
                break
            i = (self.current + 1 + attempt) % len(self.urls)
            attempt += 1
            try:
                session = self.open_session(self.urls[i], min(self.timeout, left))
            except LinkError as e:
                last = e
                if not self._backoff(deadline):
                    break
                continue
            self.current = i
            self.reconnects += 1
            self.on_event({"event": "reconnected", "url": self.urls[i], "attempts": attempt})
            return session
        self._deadline = None
        where = lost if len(self.urls) == 1 else f"any of {', '.join(self.urls)}"
        raise LinkError(f"{error}; no session could be reopened on {where} within --reconnect-timeout "
                        f"{self.reconnect_timeout:g} s (last: {last})")

    def settled(self) -> None:
        """The session `recover` returned has done its work (the replay, the step): a later loss gets a whole
        --reconnect-timeout of its own again."""
        self._deadline = None

    def _backoff(self, deadline: float) -> bool:
        """Wait the next delay (capped by the deadline); False once the deadline has passed."""
        left = deadline - self.clock()
        if left <= 0:
            return False
        self.sleep(min(self._delay, left))
        self._delay = min(2 * self._delay, MAX_DELAY_S)
        return True
