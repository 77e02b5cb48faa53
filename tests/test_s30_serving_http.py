"""s30: the HTTP layer as clients meet it over a real socket, through one `wildcheck serve` started as users start it.

The in-process test client never shows what the connection does; these go through the server's TCP stack."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from serving.launch import ServerNotReady, ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "wildcheck-ivory.onnx"
PHOTO = ROOT / "examples" / "ivory_13342.jpg"
LIMIT = 3_000_000  # WILDCHECK_MAX_BODY_BYTES of the server below
BIG = 5_000_000  # larger than loopback socket buffers: the client is still sending when the server answers


class _Server:
    """`wildcheck serve` of the shipped model: one worker, key `secret`, a 3 MB body limit, one request at a time.
    Started on first use and again if a test stopped it (the shutdown test, last in the file, does)."""

    def __init__(self, folder: Path):
        self.folder, self.process = folder, None

    def get(self) -> ServerProcess:
        if self.process is None or self.process.proc.poll() is not None:
            port = free_port()
            env = dict(os.environ, BENTOML_HOME=str(self.folder / "bentoml"), BENTOML_DO_NOT_TRACK="true",
                       OMP_NUM_THREADS="1", WILDCHECK_WORKERS="1", WILDCHECK_API_KEYS="secret",
                       WILDCHECK_MAX_BODY_BYTES=str(LIMIT), WILDCHECK_MAX_CONCURRENCY="1")
            wildcheck = str(Path(sys.executable).parent / "wildcheck")
            self.process = ServerProcess([wildcheck, "serve", str(MODEL), "--port", str(port), "--host", "127.0.0.1"],
                                         port, self.folder / f"server-{port}.log", env=env, ready_timeout=120, poll=0.2)
            try:
                self.process.wait_ready()
            except ServerNotReady as exc:
                pytest.fail(str(exc))
        return self.process


@pytest.fixture(scope="module")
def _servers(tmp_path_factory):
    if not MODEL.is_file():
        pytest.skip("the shipped model is not in this checkout")
    servers = _Server(tmp_path_factory.mktemp("s30_http"))
    try:
        yield servers
    finally:
        if servers.process is not None:
            servers.process.stop()


@pytest.fixture
def server(_servers) -> ServerProcess:
    return _servers.get()


def _post(server, body: bytes, key: str = "secret", path: str = "/v1/check", content_type: str = "image/jpeg"):
    """POST with Python's own urllib (it sends the whole body, then reads): (status, headers, JSON body)."""
    request = urllib.request.Request(server.base + path, data=body, method="POST",
                                     headers={"X-API-Key": key, "Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.headers, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, json.loads(exc.read())


def test_a_wrong_key_with_a_photo_of_some_megabytes_gets_the_401_not_a_reset(server):
    """The 401 went out before the body was read, on a connection then closed: the rest of the body met a reset,
    and urllib raised `ConnectionResetError: [Errno 104] Connection reset by peer`; the user never saw 'invalid
    API key'. urllib asks to close the connection, so the rest of its body is now read and dropped first
    (serving.middleware.Refusal)."""
    status, _, body = _post(server, b"\0" * BIG, key="wrong")
    assert (status, body["error"]["code"]) == (401, "unauthorized")
    status, _, body = _post(server, PHOTO.read_bytes())  # and the right key still gets its answer
    assert status == 200 and body["decision"] in ("block", "review", "allow")


def test_an_upload_over_the_limit_gets_the_413_not_a_reset(server):
    """Same for 413 by Content-Length: a 5 MB photo against a 3 MB limit was a reset connection."""
    status, _, body = _post(server, b"\0" * BIG)
    assert (status, body["error"]["code"]) == (413, "body_too_large")
    assert body["error"]["message"] == "request body over the 2.86 MiB limit"


def test_a_client_that_announces_its_body_is_answered_without_sending_it(server):
    """`Expect: 100-continue` (curl does it past 1 MB): the refusal comes at once, no `100 Continue` asks for the
    body, and the connection is closed (the body was never sent)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/check HTTP/1.1\r\nHost: x\r\nX-API-Key: wrong\r\nContent-Type: image/jpeg\r\n"
                     b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % BIG)
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"100 Continue" not in answer and b"connection: close" in answer.lower()


def test_a_429_reaches_a_client_that_is_still_sending_its_body(server):
    """Past WILDCHECK_MAX_CONCURRENCY (1 here) the 429 was sent with `Connection: close` before the body was read:
    a client still sending got a reset instead (under a burst of 100 4-image batches, 17-36 of them lost their
    429). Now a client that keeps its connection gets the 429 at once with `Retry-After`, the connection stays open
    and the server drops the body as it comes (no slot or permit held)."""
    holder = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:  # holds the only slot: its body never finishes (until the 408 of WILDCHECK_BODY_TIMEOUT_S, 10 s)
        holder.sendall(b"POST /v1/check HTTP/1.1\r\nHost: x\r\nX-API-Key: secret\r\nContent-Type: image/jpeg\r\n"
                       b"Content-Length: 1000\r\n\r\n\xff\xd8")
        time.sleep(1.0)  # inside: it holds the slot
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            started = time.monotonic()
            sock.sendall(b"POST /v1/check HTTP/1.1\r\nHost: x\r\nX-API-Key: secret\r\nContent-Type: image/jpeg\r\n"
                         b"Content-Length: %d\r\n\r\n" % (LIMIT - 1000) + b"\0" * (LIMIT - 1000))
            head, body = _read_response(sock)
            assert time.monotonic() - started < 5
            assert head.startswith(b"HTTP/1.1 429") and b"retry-after: 1" in head.lower(), head
            assert json.loads(body)["error"]["code"] == "too_many_requests"
            # the connection is still usable once the slot is free
            holder.close()
            time.sleep(0.3)
            photo = PHOTO.read_bytes()
            sock.sendall(b"POST /v1/check HTTP/1.1\r\nHost: x\r\nX-API-Key: secret\r\nContent-Type: image/jpeg\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(photo) + photo)
            head, body = _read_response(sock)
            assert head.startswith(b"HTTP/1.1 200"), head + body[:300]
    finally:
        holder.close()


def test_a_query_value_out_of_range_is_named_in_one_readable_line(server):
    """The message was the repr of pydantic's error list (`[{'type': 'literal_error', 'loc': ('query', ...`)."""
    status, _, body = _post(server, PHOTO.read_bytes(), path="/v1/check?explain=maybe")
    assert status == 400 and body["error"]["code"] == "invalid_request"
    assert body["error"]["message"] == "explain: Input should be 'false', 'true' or 'png', got 'maybe'"


@pytest.fixture
def execs(monkeypatch):
    """`wildcheck serve` ends in os.execve(bentoml ...): record the call instead of starting a server."""
    calls = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append(argv))
    return calls


def _serve_cli(*args):
    from typer.testing import CliRunner

    from training.cli import app

    return CliRunner().invoke(app, ["serve", *[str(a) for a in args]])


def test_serve_on_a_port_another_server_holds_says_so_before_starting_bentoml(execs):
    """bentoml ended, after all the start-up checks, in a traceback: `OSError: [Errno 98] Address already in use`
    (exit 1); an address that is not an IP (`--host localhost`) got bentoml's own error after `serving ... on`."""
    if not MODEL.is_file():
        pytest.skip("the shipped model is not in this checkout")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _serve_cli(MODEL, "--port", port, "--host", "127.0.0.1")
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}: Address already in use" in said, said
    result = _serve_cli(MODEL, "--host", "localhost")
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "--host 'localhost' is not an IP address" in said, said
    assert execs == []


def _read_all(sock: socket.socket) -> bytes:
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def _read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One response (head, body) by its Content-Length, leaving the connection open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return head, body


def test_a_client_that_left_mid_upload_does_not_keep_the_server_from_stopping(server):
    """A request whose client left before its body was complete got no answer at all; after one such request the
    server no longer stopped on SIGTERM: the launcher's 20 s grace ran out and it was killed (a rolling deploy
    waits out its whole grace period, then kills what was in flight). Last in the file: it stops the server."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/check HTTP/1.1\r\nHost: x\r\nX-API-Key: secret\r\nContent-Type: image/jpeg\r\n"
                     b"Content-Length: 1000\r\n\r\n\xff\xd8")
        time.sleep(0.3)
    time.sleep(0.3)
    server.grace = 15
    started = time.monotonic()
    server.stop()
    took = time.monotonic() - started
    assert server.proc.returncode is not None and took < 10, f"stopped after {took:.1f} s (killed at the grace's end)"
