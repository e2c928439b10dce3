"""Chat messages to a prompt by the tokenizer's chat template: one path for ``LLM.chat``,
``cacheflow generate --chat`` and the server's chat and ``/tokenize`` routes.

A template writes the model's special tokens itself (LLaMA 3's ``<|begin_of_text|>``, Gemma's
``<bos>``), so its text is encoded without the tokenizer's own (``add_special_tokens=False``), as
HF ``apply_chat_template(tokenize=True)`` does; encoding it like a plain prompt would put a second
BOS in front of every chat prompt of those models.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from cacheflow_runtime import InvalidRequestError
from cacheflow_runtime.errors import check_text

#: Roles a message may have; ``developer`` (OpenAI's newer name) is passed on as ``system``.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def _content_text(content: Any, where: str) -> str:
    """The text of a message's ``content``: a string, None, or a list of text parts (joined
    with newlines, as vLLM joins them)."""
    if content is None:
        return ""
    if isinstance(content, str):
        check_text(content, where)
        return content
    if isinstance(content, (list, tuple)):
        texts = []
        for j, part in enumerate(content):
            ok = (isinstance(part, Mapping) and part.get("type") == "text"
                  and isinstance(part.get("text"), str))
            if not ok:
                raise InvalidRequestError(f"{where}[{j}] must be a text part "
                                          f"{{'type': 'text', 'text': str}}, got {part!r}",
                                          param="messages")
            check_text(part["text"], f"{where}[{j}].text")
            texts.append(part["text"])
        return "\n".join(texts)
    raise InvalidRequestError(f"{where} must be a string, a list of text parts or None, "
                              f"got {type(content).__name__}", param="messages")


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls`` (OpenAI's form: ``{"id", "type": "function",
    "function": {"name", "arguments"}}`` with ``arguments`` a JSON object, as a string or
    already parsed) in the form chat templates read: ``arguments`` parsed to a dict, as vLLM
    and HF ``apply_chat_template`` pass it."""
    if not isinstance(calls, (list, tuple)):
        raise InvalidRequestError(f"{where} must be a list of tool calls, got "
                                  f"{type(calls).__name__}", param="messages")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str) or not name:
            raise InvalidRequestError(f"{where}[{j}] must be {{'type': 'function', 'function': "
                                      f"{{'name': str, 'arguments': str}}}}, got {call!r:.120}",
                                      param="messages")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(f"{where}[{j}].function.arguments must be a JSON "
                                          f"object, got {arguments!r:.80} ({exc.msg})",
                                          param="messages") from None
        if not isinstance(arguments, Mapping):
            raise InvalidRequestError(f"{where}[{j}].function.arguments must be a JSON object, "
                                      f"got {type(arguments).__name__}", param="messages")
        entry = dict(call)
        entry["type"] = call.get("type", "function")
        entry["function"] = {**function, "name": name, "arguments": dict(arguments)}
        out.append(entry)
    return out


def template_messages(messages: Any) -> list[dict[str, Any]]:
    """``messages`` checked and put in the form chat templates take: a list of
    ``{"role", "content"[, "name"][, "tool_call_id"][, "tool_calls"]}`` with string content
    (text parts joined by newlines, ``developer`` as ``system``) and an assistant message's tool
    calls with their arguments parsed (:func:`_tool_calls`).

    Raises:
        InvalidRequestError: not a non-empty list of messages, or a message whose role, content
            or name is not one a chat template can take (the message's index is named).
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequestError(f"messages must be a non-empty list of "
                                  f"{{'role': ..., 'content': ...}} dicts, got {messages!r:.80}",
                                  param="messages")
    rendered = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequestError(f"messages[{i}] must be a dict with 'role' and 'content', "
                                      f"got {type(message).__name__}", param="messages")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise InvalidRequestError(f"messages[{i}].role must be one of "
                                      f"{', '.join(CHAT_ROLES)}, got {role!r}", param="messages")
        entry = {"role": "system" if role == "developer" else role,
                 "content": _content_text(message.get("content"), f"messages[{i}].content")}
        for key in ("name", "tool_call_id"):
            value = message.get(key)
            if value is None:
                continue
            if not isinstance(value, str):
                raise InvalidRequestError(f"messages[{i}].{key} must be a string, got "
                                          f"{type(value).__name__}", param="messages")
            check_text(value, f"messages[{i}].{key}")
            entry[key] = value
        if message.get("tool_calls") is not None:
            if role != "assistant":
                raise InvalidRequestError(f"messages[{i}].tool_calls: only assistant messages "
                                          f"carry tool calls, got role {role!r}",
                                          param="messages")
            entry["tool_calls"] = _tool_calls(message["tool_calls"], f"messages[{i}].tool_calls")
        rendered.append(entry)
    return rendered


def render_chat(tokenizer: Any, messages: Any, *, add_generation_prompt: bool = True,
                continue_final_message: bool = False,
                chat_template: Optional[str] = None,
                chat_template_kwargs: Optional[Mapping[str, Any]] = None) -> str:
    """The prompt text of ``messages`` by ``chat_template`` (default: the tokenizer's).

    ``add_generation_prompt`` ends the text with the assistant's turn header;
    ``continue_final_message`` leaves the last message open, so that generation continues it.
    ``chat_template_kwargs``: more variables for the template (e.g. Qwen3's
    ``enable_thinking``), as vLLM passes them.

    Raises:
        InvalidRequestError: bad messages (``template_messages``), both options on, no template,
            or the template failed on these messages (e.g. an order of roles it refuses).
    """
    dicts = template_messages(messages)
    if add_generation_prompt and continue_final_message:
        raise InvalidRequestError("add_generation_prompt and continue_final_message cannot both "
                                  "be true: the first starts a new assistant turn, the second "
                                  "continues the last message", param="continue_final_message")
    if continue_final_message and dicts[-1]["role"] != "assistant":
        raise InvalidRequestError(f"continue_final_message needs the last message to be the "
                                  f"assistant's, got {dicts[-1]['role']!r}",
                                  param="continue_final_message")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model's tokenizer has no chat template: give the prompt "
                                  "as text (generate / completions) or pass chat_template",
                                  param="messages")
    extra = dict(chat_template_kwargs or {})
    reserved = sorted(set(extra) & {"conversation", "tokenize", "chat_template",
                                    "add_generation_prompt", "continue_final_message"})
    if reserved:
        raise InvalidRequestError(f"chat_template_kwargs cannot set {', '.join(reserved)}: "
                                  "pass them as options of their own",
                                  param="chat_template_kwargs")
    try:
        return tokenizer.apply_chat_template(dicts, tokenize=False, chat_template=chat_template,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message,
                                             **extra)
    except Exception as exc:  # jinja2 errors and the template's own raise_exception
        raise InvalidRequestError(f"the chat template failed on these messages: {exc}",
                                  param="messages") from None


def load_chat_template(value: Optional[str], option: str = "--chat-template") -> Optional[str]:
    """The chat template an option names: the text of the file at ``value``, or ``value`` itself
    when it is a Jinja template written inline (vLLM's two forms); None stays None.

    Raises:
        ValueError naming ``option``: no such file and no template syntax in the value, a file
            that cannot be read as UTF-8, or a template Jinja cannot parse.
    """
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        try:
            template = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{option}: cannot read {value!r}: {exc}") from None
    elif "{{" in value or "{%" in value:
        template = value
    else:
        raise ValueError(f"{option}: {value!r} is neither a file nor a Jinja template "
                         "(inline templates hold {{ ... }} or {% ... %})")
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"{option}: the template does not parse: {exc.message} "
                         f"(line {exc.lineno})") from None
    return template


def encode_chat(tokenizer: Any, text: str, add_special_tokens: bool = False) -> list[int]:
    """The token ids of a rendered chat prompt: by default without the tokenizer's special
    tokens, which the template wrote already (see the module docstring)."""
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
