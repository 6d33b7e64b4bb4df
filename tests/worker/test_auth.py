"""OIDC on /pubsub/push: tokens are signed here with a local RSA key whose certificate a local HTTP
server publishes in Google's format, and checked by google.oauth2.id_token against it."""
from __future__ import annotations

import base64
import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from worker.app import Runtime, build_runtime
from worker.auth import AuthError, PushAuthConfig, PushVerifier
from worker.engine import Engine
from worker.service import ServiceConfig, create_app
from worker.service_run import BackgroundServer
from worker.settings import Settings

pytestmark = pytest.mark.slow

AUDIENCE = "https://gemma-batch.test/pubsub/push"
ACCOUNT = "push-invoker@test-project.iam.gserviceaccount.com"


class SigningKey:
    """An RSA key, its self-signed certificate, and ID tokens signed with it."""

    def __init__(self, kid: str) -> None:
        self.kid = kid
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, kid)])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
                .not_valid_after(now + dt.timedelta(days=1)).sign(self.key, hashes.SHA256()))
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()

    def token(self, *, audience: str = AUDIENCE, email: str = ACCOUNT, verified: bool = True,
              expires_in: int = 600) -> str:
        now = int(time.time())
        claims = {"iss": "https://accounts.google.com", "aud": audience, "sub": "1234", "email": email,
                  "email_verified": verified, "iat": now - 60, "exp": now + expires_in}
        pem = self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
        return jwt.encode(claims, pem, algorithm="RS256", headers={"kid": self.kid})


@pytest.fixture(scope="module")
def google_key() -> SigningKey:
    return SigningKey("local-key-1")


@pytest.fixture(scope="module")
def certs_url(google_key: SigningKey) -> Iterator[str]:
    body = json.dumps({google_key.kid: google_key.cert_pem}).encode()

    class Certs(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Certs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/oauth2/v1/certs"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("auth-results")


@pytest.fixture(scope="module")
def runtime(settings: Settings, engine: Engine, results_dir: Path) -> Iterator[Runtime]:
    rt = build_runtime(settings, results=str(results_dir), engine=engine)
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def http(runtime: Runtime, certs_url: str) -> Iterator[httpx.Client]:
    auth = PushAuthConfig(audience=AUDIENCE, service_account=ACCOUNT, certs_url=certs_url)
    with BackgroundServer(create_app(runtime, config=ServiceConfig(push_auth=auth))) as srv, \
            httpx.Client(base_url=srv.url, timeout=120) as client:
        yield client


def _push(task_id: str) -> dict:
    task = {"task_id": task_id, "kind": "embed", "payload": {"texts": ["authenticated"], "dims": 4}}
    return {"message": {"data": base64.b64encode(json.dumps(task).encode()).decode(), "messageId": "1"},
            "subscription": "projects/p/subscriptions/push"}


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_push_without_a_valid_token_is_401(http: httpx.Client, google_key: SigningKey) -> None:
    # Given pushes with no token, a garbled one, one signed by an unknown key, and an expired one
    stranger = SigningKey("local-key-1")  # same key id, different key: the signature cannot verify
    attempts = {
        "missing": {},
        "garbled": _bearer("not.a.token"),
        "forged": _bearer(stranger.token()),
        "expired": _bearer(google_key.token(expires_in=-120)),
    }
    # When each is sent
    answers = {name: http.post("/pubsub/push", json=_push(f"t-{name}"), headers=h) for name, h in attempts.items()}
    # Then each is refused as unauthenticated and nothing runs
    for name, response in answers.items():
        assert response.status_code == 401, (name, response.text)
        assert response.json()["error"]["code"] == "unauthenticated"
    assert "expired" in answers["expired"].json()["error"]["message"].lower()


def test_push_with_a_token_for_someone_else_is_403(http: httpx.Client, google_key: SigningKey,
                                                   results_dir: Path) -> None:
    # Given well-signed tokens for another audience, another account, and an unverified email
    attempts = {
        "audience": google_key.token(audience="https://someone-else.test/push"),
        "account": google_key.token(email="intruder@test-project.iam.gserviceaccount.com"),
        "unverified": google_key.token(verified=False),
    }
    # When each is sent
    answers = {name: http.post("/pubsub/push", json=_push(f"t-{name}"), headers=_bearer(token))
               for name, token in attempts.items()}
    # Then each is forbidden with a message saying which check failed, and no result is written
    for name, response in answers.items():
        assert response.status_code == 403, (name, response.text)
        assert response.json()["error"]["code"] == "permission_denied"
    assert "audience" in answers["audience"].json()["error"]["message"]
    assert "intruder" in answers["account"].json()["error"]["message"]
    assert not list(results_dir.rglob("t-*.json"))


def test_push_with_a_valid_token_runs_the_task(http: httpx.Client, google_key: SigningKey,
                                               results_dir: Path) -> None:
    # Given a token Google would send: our audience, the push account, verified
    token = google_key.token()
    # When the push carries it
    response = http.post("/pubsub/push", json=_push("t-valid"), headers=_bearer(token))
    # Then the task runs and its result is written before the 200
    assert response.status_code == 200, response.text
    assert json.loads((results_dir / "adhoc" / "t-valid.json").read_text())["status"] == "ok"


def test_other_routes_need_no_token(http: httpx.Client) -> None:
    assert http.get("/healthz").status_code == 200


def test_verifier_reports_unreachable_certificates_as_retryable(google_key: SigningKey) -> None:
    # Given a verifier whose certificate URL answers nothing
    verifier = PushVerifier(PushAuthConfig(audience=AUDIENCE, certs_url="http://127.0.0.1:9/certs"))
    # When a token is checked
    with pytest.raises(AuthError) as caught:
        verifier.verify(f"Bearer {google_key.token()}")
    # Then it is a 503 (Pub/Sub will retry), not a refusal
    assert caught.value.status == 503 and "certificates" in caught.value.message
