"""OIDC checks for Pub/Sub push: the request must carry a Google-signed ID token for our audience
(and, when configured, for the push subscription's service account).

Missing or unverifiable token (bad signature, expired, malformed): 401. A valid token for another
audience or another account: 403. Certificates that cannot be fetched: 503, so Pub/Sub retries."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import google.auth.exceptions
import google.auth.transport.requests
from google.auth import transport
from google.oauth2 import id_token

log = logging.getLogger(__name__)

GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"


class AuthError(Exception):
    """A refused push request: the HTTP status, and a message saying what to fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _CachingRequest(transport.Request):
    """Google's signing certificates change daily; fetching them once per push would add a round trip
    to every delivery, so successful GETs are kept for `ttl_s`."""

    def __init__(self, *, ttl_s: float) -> None:
        self._inner = google.auth.transport.requests.Request()
        self._ttl_s = ttl_s
        self._cache: dict[str, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def __call__(self, url: str, method: str = "GET", body: Any = None, headers: Any = None,
                 timeout: float | None = None, **kwargs: Any) -> Any:
        if method != "GET" or body is not None:
            return self._inner(url, method=method, body=body, headers=headers, timeout=timeout, **kwargs)
        with self._lock:
            hit = self._cache.get(url)
            if hit is not None and time.monotonic() - hit[0] < self._ttl_s:
                return hit[1]
        response = self._inner(url, method=method, headers=headers, timeout=timeout or 10, **kwargs)
        if response.status == 200:
            with self._lock:
                self._cache[url] = (time.monotonic(), response)
        return response


@dataclass(frozen=True)
class PushAuthConfig:
    audience: str
    service_account: str | None = None
    certs_url: str = GOOGLE_CERTS_URL
    certs_ttl_s: float = 300.0


class PushVerifier:
    """Checks `Authorization: Bearer <ID token>` on push requests. Blocking (it may fetch certificates):
    call it from a worker thread."""

    def __init__(self, config: PushAuthConfig) -> None:
        self.config = config
        self._request = _CachingRequest(ttl_s=config.certs_ttl_s)

    def verify(self, authorization: str | None) -> Mapping[str, Any]:
        """The token's claims, or AuthError."""
        token = _bearer(authorization)
        try:
            # Signature and expiry first (401); audience and account below, so they can answer 403.
            claims = id_token.verify_token(token, self._request, audience=None, certs_url=self.config.certs_url)
        except google.auth.exceptions.TransportError as exc:
            raise AuthError(503, f"could not fetch the token signing certificates from "
                                 f"{self.config.certs_url}: {exc}; retry later") from None
        except (ValueError, google.auth.exceptions.GoogleAuthError) as exc:
            raise AuthError(401, f"the bearer token is not a valid Google-signed ID token: {exc}") from None
        audiences = claims.get("aud")
        audiences = audiences if isinstance(audiences, list) else [audiences]
        if self.config.audience not in audiences:
            raise AuthError(403, f"the token's audience {claims.get('aud')!r} is not this service's push audience "
                                 f"{self.config.audience!r}; set the subscription's push audience to it")
        account = self.config.service_account
        if account is not None:
            if claims.get("email") != account:
                raise AuthError(403, f"the token was issued to {claims.get('email')!r}, not to the push service "
                                     f"account {account!r}")
            if claims.get("email_verified") is not True:
                raise AuthError(403, f"the token's email {account!r} is not verified (email_verified is not true)")
        return claims


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise AuthError(401, "missing Authorization header; Pub/Sub push must be configured with an OIDC token "
                             "(--push-auth-service-account) for this service's audience")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(401, "the Authorization header must be 'Bearer <Google-signed ID token>'")
    return token.strip()
