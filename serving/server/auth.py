"""API keys: `Authorization: Bearer KEY` on every route but GET /health (the probes' route).

Keys come from `$LLMCLUSTER_API_KEYS` (comma-separated; the Helm chart fills it from a Secret) and
`server.auth.api_keys_file` (one per line). Only their SHA-256 digests are kept; a presented key is
hashed and compared with every digest by `hmac.compare_digest`, so the time taken tells nothing
about how much of a key matched. Requests carry the matching key's id (a digest prefix, never the
key) to the rate limiter. /metrics needs a key too: it names the model and shows the load.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.config import AuthConfig
from serving.errors import LLMClusterError
from serving.server.http_errors import APIError

KEYS_ENV = "LLMCLUSTER_API_KEYS"
OPEN_PATHS = frozenset({"/health"})
SCOPE_KEY = "api_key_id"  # where the key's id goes in the ASGI scope's "state"


class APIKeys:
    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(key) for key in dict.fromkeys(keys)]

    def __len__(self) -> int:
        return len(self._digests)

    @classmethod
    def load(cls, auth: AuthConfig, environ: Mapping[str, str] = os.environ) -> APIKeys:
        """The keys of the environment and the keys file; refuses to run with key checks on and no keys."""
        keys = [key.strip() for key in environ.get(KEYS_ENV, "").split(",")]
        if auth.api_keys_file is not None:
            lines = Path(auth.api_keys_file).read_text(encoding="utf-8").splitlines()
            keys += [line.strip() for line in lines if not line.lstrip().startswith("#")]
        loaded = cls(key for key in keys if key)
        if auth.require_api_key and not loaded:
            raise LLMClusterError(f"require_api_key is set but there are no keys: set ${KEYS_ENV} or server.auth.api_keys_file")
        return loaded

    def identify(self, presented: str) -> str | None:
        """The id of the key if it is one of ours, else None; every stored key is compared, each in constant time."""
        digest = _digest(presented)
        found = None
        for stored in self._digests:
            if hmac.compare_digest(stored, digest):
                found = stored
        return None if found is None else found.hex()[:12]


class RequireAPIKey:
    """ASGI middleware: 401 in OpenAI's format without a valid key; the key's id into scope["state"]."""

    def __init__(self, app: ASGIApp, keys: APIKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            message = "no API key: send it as the header 'Authorization: Bearer YOUR_KEY'"
            return await _unauthorized(message, None).response()(scope, receive, send)
        key_id = self.keys.identify(token.strip())
        if key_id is None:
            return await _unauthorized("incorrect API key provided", "invalid_api_key").response()(scope, receive, send)
        scope.setdefault("state", {})[SCOPE_KEY] = key_id
        await self.app(scope, receive, send)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _unauthorized(message: str, code: str | None) -> APIError:
    return APIError(401, message, code=code, headers={"WWW-Authenticate": "Bearer"})
