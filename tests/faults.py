"""What a client sees of a request while the server is being hurt: it completes, it ends with an error
the client can see, or it is lost (hangs past its deadline, or ends early without saying why)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests

COMPLETE, ERROR, LOST = "complete", "error", "lost"


@dataclass
class Outcome:
    kind: str = LOST
    detail: str = ""
    started: float = field(default_factory=time.monotonic)
    first_token: threading.Event = field(default_factory=threading.Event)
    ended: float = 0.0


def stream(outcome: Outcome, url: str, body: dict, deadline_s: float, headers: dict[str, str] | None = None) -> None:
    """A streaming request, followed to its end; the read timeout is the deadline for each next event."""
    try:
        with requests.post(url, json=body | {"stream": True}, headers=headers, stream=True, timeout=(10, deadline_s)) as response:
            if response.status_code != 200:
                outcome.kind, outcome.detail = ERROR, f"HTTP {response.status_code}"
                return
            for line in response.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                outcome.first_token.set()
                if line == b"data: [DONE]":
                    outcome.kind = COMPLETE
                elif "error" in (event := json.loads(line[6:])):
                    outcome.kind, outcome.detail = ERROR, event["error"]["message"]
            if outcome.kind == LOST:
                outcome.detail = "the stream ended without [DONE] or an error"
    except requests.exceptions.RequestException as error:
        if "timed out" in str(error):  # requests reports a read timeout mid-stream as a ConnectionError
            outcome.kind, outcome.detail = LOST, f"no event for {deadline_s} s"
        else:  # connection reset or refused: the client knows
            outcome.kind, outcome.detail = ERROR, f"{type(error).__name__}: {error}"
    finally:
        outcome.first_token.set()
        outcome.ended = time.monotonic()


def complete(outcome: Outcome, url: str, body: dict, deadline_s: float, headers: dict[str, str] | None = None) -> None:
    """A non-streaming request; `first_token` is set once it is sent."""
    outcome.first_token.set()
    try:
        response = requests.post(url, json=body, headers=headers, timeout=(10, deadline_s))
        if response.status_code == 200 and response.json()["choices"]:
            outcome.kind = COMPLETE
        else:
            outcome.kind, outcome.detail = ERROR, f"HTTP {response.status_code}"
    except requests.exceptions.ReadTimeout:
        outcome.kind, outcome.detail = LOST, f"no answer for {deadline_s} s"
    except requests.exceptions.RequestException as error:
        outcome.kind, outcome.detail = ERROR, f"{type(error).__name__}: {error}"
    finally:
        outcome.first_token.set()
        outcome.ended = time.monotonic()


class InFlight:
    """Requests running in threads; `outcomes` fill in as they end."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self._threads: list[threading.Thread] = []

    def start(self, call: Callable[..., None], *args: Any) -> Outcome:
        """Run `call(outcome, *args)` (stream or complete) in a thread."""
        outcome = Outcome()
        self.outcomes.append(outcome)
        thread = threading.Thread(target=call, args=(outcome, *args), daemon=True)
        thread.start()
        self._threads.append(thread)
        return outcome

    def wait_for_first_tokens(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for outcome in self.outcomes:
            assert outcome.first_token.wait(max(0.0, deadline - time.monotonic())), "a request got no first token in time"

    def join(self, timeout_s: float) -> list[Outcome]:
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return self.outcomes
