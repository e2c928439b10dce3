"""``cacheflow chat`` and ``cacheflow complete``: terminal clients of a running server, with
vLLM's ``vllm chat`` / ``vllm complete`` flags.

Each reads messages (or prompts) from the terminal, one per line, until end of input, and
prints the server's streamed reply as it comes; ``--quick TEXT`` sends one and exits. A chat
keeps the conversation (the replies included) and sends all of it each turn. Only the standard
library talks to the server, so the clients start at once and need nothing the server lacks.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any, Optional, TextIO

from cacheflow_serve.bench_common import positive_int

DEFAULT_URL = "http://localhost:8000/v1"


class ClientError(RuntimeError):
    """The server could not be reached or answered with an error (the message says which)."""


def add_client_arguments(parser: argparse.ArgumentParser, *, chat: bool) -> None:
    """The flags of ``cacheflow chat`` (``chat=True``) or ``cacheflow complete``."""
    parser.add_argument("--url", default=DEFAULT_URL,
                        help="the server's OpenAI API base URL (default: %(default)s)")
    parser.add_argument("--model-name", default=None,
                        help="the model to ask (default: the first the server lists)")
    parser.add_argument("--api-key", default=None,
                        help="the server's API key (default: $CACHEFLOW_API_KEY, else "
                             "$OPENAI_API_KEY, else none)")
    if chat:
        parser.add_argument("--system-prompt", default=None,
                            help="a system message that opens the conversation")
    parser.add_argument("-q", "--quick", metavar="TEXT", default=None,
                        help="send this one " + ("message" if chat else "prompt")
                             + ", print the reply and exit (default: read them from the "
                               "terminal, one per line, until end of input)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="most tokens per reply (default: the server's)")


class _Client:
    """The OpenAI routes of one server, through urllib."""

    def __init__(self, url: str, api_key: Optional[str]) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def _open(self, path: str, body: Optional[dict[str, Any]] = None) -> Any:
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(self.url + path, data=data, headers=self.headers)
        try:
            return urllib.request.urlopen(request, timeout=600)
        except urllib.error.HTTPError as exc:
            raise ClientError(f"{self.url + path} answered {exc.code}: "
                              f"{_error_message(exc.read())}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ClientError(f"cannot reach the server at {self.url}: {reason}") from None

    def first_model(self) -> str:
        """The first model id ``GET /models`` lists."""
        with self._open("/models") as response:
            try:
                models = json.loads(response.read()).get("data") or []
                return str(models[0]["id"])
            except (ValueError, AttributeError, LookupError, TypeError):
                raise ClientError(f"{self.url}/models lists no model; name one with "
                                  "--model-name") from None

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The JSON events of a streamed ``POST`` until ``[DONE]``; ClientError for a stream
        that breaks off or is not server-sent JSON events."""
        with self._open(path, {**body, "stream": True}) as response:
            lines = iter(response)
            while True:
                try:
                    raw = next(lines, None)
                    if raw is None:
                        raise ClientError(f"the server at {self.url} closed the stream before "
                                          "its end ([DONE])")
                    line = raw.decode("utf-8").strip()
                    if not line.startswith("data:"):
                        continue
                    payload = line[len("data:"):].strip()
                    if payload == "[DONE]":
                        return
                    event = json.loads(payload)
                except (http.client.HTTPException, OSError) as exc:
                    raise ClientError(f"the stream from {self.url} broke off: "
                                      f"{type(exc).__name__}: {exc}") from None
                except ValueError as exc:  # bad UTF-8 or JSON
                    raise ClientError(f"the server at {self.url} sent a malformed event: "
                                      f"{exc}") from None
                if not isinstance(event, dict):
                    raise ClientError(f"the server at {self.url} sent a malformed event: "
                                      f"{payload[:200]}")
                if "error" in event:
                    raise ClientError(f"the server failed the request: "
                                      f"{_error_message(payload.encode('utf-8'))}")
                yield event


def _error_message(body: bytes) -> str:
    """The message of an OpenAI error body (else the body itself, shortened)."""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:300]


def _chat_reply(client: _Client, model: str, messages: list[dict[str, str]],
                max_tokens: Optional[int], out: TextIO) -> str:
    """Streams one chat reply to ``out``; returns its text."""
    body: dict[str, Any] = {"model": model, "messages": messages}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return _print_stream(client.stream("/chat/completions", body),
                         lambda choice: choice.get("delta", {}).get("content"), out)


def _completion(client: _Client, model: str, prompt: str, max_tokens: Optional[int],
                out: TextIO) -> str:
    """Streams one completion to ``out``; returns its text."""
    body: dict[str, Any] = {"model": model, "prompt": prompt}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return _print_stream(client.stream("/completions", body),
                         lambda choice: choice.get("text"), out)


def _print_stream(events: Iterator[dict[str, Any]],
                  text_of: Callable[[dict[str, Any]], Optional[str]], out: TextIO) -> str:
    parts = []
    for event in events:
        for choice in event.get("choices") or []:
            text = text_of(choice)
            if text:
                parts.append(text)
                out.write(text)
                out.flush()
    out.write("\n")
    out.flush()
    return "".join(parts)


def _lines(quick: Optional[str], prompt: str) -> Iterator[str]:
    """``quick`` alone, or the lines read until end of input (or Ctrl-C), each typed after
    ``prompt`` on a terminal (piped input gets no prompt)."""
    if quick is not None:
        yield quick
        return
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input(prompt) if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not interactive:
            if not line:
                return
            line = line.rstrip("\n")
        yield line


def api_key(given: Optional[str]) -> Optional[str]:
    """The API key a client sends: ``--api-key``, else $CACHEFLOW_API_KEY (the key ``cacheflow
    serve`` reads), else $OPENAI_API_KEY, else none."""
    return given or os.environ.get("CACHEFLOW_API_KEY") or os.environ.get("OPENAI_API_KEY")


def _session(args: argparse.Namespace) -> tuple[_Client, str]:
    positive_int("--max-tokens", args.max_tokens)
    client = _Client(args.url, api_key(args.api_key))
    return client, args.model_name or client.first_model()


def run_chat(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    """Runs ``cacheflow chat``: a conversation with the served model, its replies printed to
    ``out`` (default: stdout)."""
    out = out or sys.stdout
    try:
        client, model = _session(args)
        messages: list[dict[str, str]] = []
        if args.system_prompt:
            messages.append({"role": "system", "content": args.system_prompt})
        for line in _lines(args.quick, "> "):
            messages.append({"role": "user", "content": line})
            reply = _chat_reply(client, model, messages, args.max_tokens, out)
            messages.append({"role": "assistant", "content": reply})
    except ClientError as exc:
        print(f"cacheflow: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C during a reply: end the line, exit as interrupted
        out.write("\n")
        return 130
    return 0


def run_complete(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    """Runs ``cacheflow complete``: a completion of each prompt by the served model, printed to
    ``out`` (default: stdout)."""
    out = out or sys.stdout
    try:
        client, model = _session(args)
        for line in _lines(args.quick, "> "):
            _completion(client, model, line, args.max_tokens, out)
    except ClientError as exc:
        print(f"cacheflow: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        out.write("\n")
        return 130
    return 0
