"""``cacheflow chat`` and ``cacheflow complete`` against a server in this process: what they
print is the server's reply to the same request (greedy by the server's defaults), a chat keeps
its history, the API key is sent, and an unreachable or refusing server is a one-line error."""

from __future__ import annotations

import io
import json
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cacheflow_serve.cli import main
from cacheflow_serve.server import ServerThread

from serve_testutil import server_in_thread

ONE_TORCH_THREAD = True  # see conftest.py
KEY = "client-key"


@pytest.fixture(scope="module")
def server(chat_tiny_path: Path) -> Iterator[ServerThread]:
    with server_in_thread(chat_tiny_path, {"kv_cache_blocks": 256}, api_key=KEY,
                          generation_defaults={"temperature": 0.0}) as thread:
        yield thread


def _post(server: ServerThread, path: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = httpx.post(server.base_url + "/v1" + path, json={"model": "tiny", **body},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _chat(server: ServerThread, messages: list[dict[str, str]]) -> str:
    return _post(server, "/chat/completions",
                 {"messages": messages, "max_tokens": 6})["choices"][0]["message"]["content"]


def test_quick_chat_and_completion_print_the_servers_reply(
        server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    url = ["--url", server.base_url + "/v1", "--api-key", KEY, "--max-tokens", "6"]
    assert main(["chat", *url, "-q", "hello there", "--system-prompt", "be brief"]) == 0
    want = _chat(server, [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": "hello there"}])
    assert want and capsys.readouterr().out == want + "\n"
    assert main(["complete", *url, "--quick", "abc"]) == 0
    text = _post(server, "/completions", {"prompt": "abc", "max_tokens": 6})["choices"][0]["text"]
    assert capsys.readouterr().out == text + "\n"


def test_chat_keeps_the_conversation(server: ServerThread, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("first\nsecond\n"))
    monkeypatch.setenv("CACHEFLOW_API_KEY", KEY)  # the key from the environment
    assert main(["chat", "--url", server.base_url + "/v1", "--model-name", "tiny",
                 "--max-tokens", "6"]) == 0
    first = _chat(server, [{"role": "user", "content": "first"}])
    second = _chat(server, [{"role": "user", "content": "first"},
                            {"role": "assistant", "content": first},
                            {"role": "user", "content": "second"}])
    assert capsys.readouterr().out == f"{first}\n{second}\n"  # piped: no prompts


def test_errors_are_one_line_with_status_1(server: ServerThread,
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CACHEFLOW_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert main(["chat", "--url", server.base_url + "/v1", "-q", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cacheflow: error: ") and "answered 401: invalid or missing API key" \
        in err and err.count("\n") == 1
    assert main(["complete", "--url", server.base_url + "/v1", "--api-key", KEY,
                 "--model-name", "gpt-17", "-q", "hi"]) == 1
    assert "answered 404: the model 'gpt-17' does not exist" in capsys.readouterr().err
    assert main(["complete", "--url", "http://127.0.0.1:9/v1", "-q", "hi"]) == 1
    assert "cannot reach the server at http://127.0.0.1:9/v1" in capsys.readouterr().err
    assert main(["chat", "--url", server.base_url + "/v1", "--max-tokens", "0", "-q", "x"]) == 2
    assert "--max-tokens must be a positive integer, got 0" in capsys.readouterr().err


def _broken_server(how: str) -> tuple[str, threading.Thread]:
    """A server that lists one model, then streams two events of a completion and breaks off
    ``how``: "reset" (connection reset), "cut" (inside a chunk), "nodone" (a clean end without
    [DONE]) or "badjson"."""
    listener = socket.create_server(("127.0.0.1", 0))

    def chunk(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data)

    def read_request(conn: socket.socket) -> bytes:
        # All of it: closing a socket with unread bytes resets the connection instead.
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            body += conn.recv(65536)
        return head

    def serve() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            request = read_request(conn)
            if b"/models" in request.split(b"\r\n")[0]:
                body = json.dumps({"data": [{"id": "m"}]}).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                conn.close()
                continue
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            for text in ("Hello", " wor"):
                event = {"choices": [{"index": 0, "text": text}]}
                conn.sendall(chunk(b"data: " + json.dumps(event).encode() + b"\n\n"))
            if how == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif how == "cut":
                conn.sendall(b"20\r\ndata: {\"cho")
            elif how == "nodone":
                conn.sendall(b"0\r\n\r\n")
            else:
                conn.sendall(chunk(b"data: {not json\n\n") + b"0\r\n\r\n")
            conn.close()
        listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/v1", thread


@pytest.mark.parametrize("how, message", [
    ("reset", "broke off"), ("cut", "broke off"), ("nodone", "closed the stream before its end"),
    ("badjson", "sent a malformed event"),
])
def test_a_stream_that_breaks_off_is_a_one_line_error(
        how: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """What streamed is printed, then one error line and status 1 (no traceback, never 0)."""
    url, thread = _broken_server(how)
    assert main(["complete", "--url", url, "-q", "hi"]) == 1
    thread.join(timeout=10)
    captured = capsys.readouterr()
    if how != "reset":  # a reset may drop what the client had not read yet
        assert captured.out.startswith("Hello wor")
    assert captured.err.startswith("cacheflow: error: ") and message in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_ctrl_c_during_a_reply_exits_130_without_a_traceback(
        server: ServerThread, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import cacheflow_serve.client_cli as client_cli

    def interrupted(*_: Any) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(client_cli, "_chat_reply", interrupted)
    assert main(["chat", "--url", server.base_url + "/v1", "--api-key", KEY, "-q", "hi"]) == 130
    captured = capsys.readouterr()
    assert captured.out == "\n" and captured.err == ""
