"""Conversations: one format (a list of ``{"role", "content"}`` messages) from the shapes chat data comes in.

Accepted per record:

* OpenAI / Hugging Face chat format, ``[{"role": "user", "content": "..."}, ...]`` with roles ``system``,
  ``user`` and ``assistant``; ``content`` a string, or OpenAI's list of ``{"type": "text", "text": ...}`` parts;
* ShareGPT, ``[{"from": "human", "value": "..."}, ...]``: ``human`` -> user, ``gpt`` -> assistant, ``system``
  stays (and the other speaker names ShareGPT dumps use for the model: ``chatgpt``, ``bard``, ``bing``,
  ``model``).

A message without a role or content, an unknown role, or content that is not text is refused naming the
record and the message. Messages after the last assistant turn are dropped (nothing to learn from them);
a conversation with no assistant turn has nothing to learn and is skipped by the caller (counted, and
refused when every record is one).

This module imports nothing heavy: ``peftlab.kinds`` uses it for ``peftlab predict --input`` and the server.
"""

from __future__ import annotations

from typing import Any

from peftlab.errors import PeftlabError

ROLES = ("system", "user", "assistant")
# ShareGPT's speaker names (and the roles themselves) -> role
SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
            "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system"}
CONVERSATION_COLUMNS = ("messages", "conversations")  # looked for, in this order, when no column is named


def normalize_messages(value: Any, where: str, *, field: str = "messages") -> list[dict[str, str]]:
    """``value`` (a conversation in either format) as ``[{"role", "content"}, ...]``; one sentence otherwise.

    ``where`` names the record ("chats.jsonl, line 7"), ``field`` the column the conversation came from."""
    if not isinstance(value, list):
        what = "null" if value is None else f"a JSON {type(value).__name__}"
        raise PeftlabError(f"{where}: field '{field}' is {what}, not a list of messages "
                           "([{\"role\": \"user\", \"content\": \"...\"}, ...]).")
    if not value:
        raise PeftlabError(f"{where}: field '{field}' is an empty list; a conversation needs messages.")
    messages = []
    for number, message in enumerate(value, start=1):
        at = f"{where}: field '{field}', message {number}"
        if not isinstance(message, dict):
            raise PeftlabError(f"{at} is a JSON {type(message).__name__}, not an object with 'role' and 'content'.")
        messages.append({"role": _role(message, at), "content": _content(message, at)})
    return messages


def _role(message: dict, at: str) -> str:
    if "role" in message:
        key, mapping = "role", {role: role for role in ROLES}
    elif "from" in message:
        key, mapping = "from", SPEAKERS
    else:
        raise PeftlabError(f"{at} has no 'role' (or ShareGPT's 'from'); fields present: "
                           f"{', '.join(repr(k) for k in message) or 'none'}.")
    value = message[key]
    role = mapping.get(value.strip().lower()) if isinstance(value, str) else None
    if role is None:
        allowed = ", ".join(ROLES) if key == "role" else ", ".join(sorted(SPEAKERS))
        raise PeftlabError(f"{at} has the unknown {key} {value!r}; use one of: {allowed}.")
    return role


def _content(message: dict, at: str) -> str:
    key = "content" if "content" in message or "role" in message else "value"
    if key not in message:
        raise PeftlabError(f"{at} has no '{key}' (the message's text); fields present: "
                           f"{', '.join(repr(k) for k in message)}.")
    content = message[key]
    if isinstance(content, list):  # OpenAI's content parts: text parts only
        if all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
               for part in content):
            return "".join(part["text"] for part in content)
        raise PeftlabError(f"{at}: field '{key}' holds parts that are not text ({{\"type\": \"text\", \"text\": "
                           "...}); only text is supported.")
    if not isinstance(content, str):
        what = "null" if content is None else f"a JSON {type(content).__name__}"
        raise PeftlabError(f"{at}: field '{key}' is {what}, not text.")
    return content


def learnable(messages: list[dict[str, str]]) -> list[dict[str, str]] | None:
    """The conversation up to and including its last assistant turn; None when it has no assistant turn."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    return None if last is None else messages[: last + 1]


def split_last_answer(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """(the messages before the last assistant turn, that turn's text): a prompt and its reference answer."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def user_turn(text: str) -> list[dict[str, str]]:
    """A bare text as a conversation: one user message (what ``peftlab predict --text`` sends a chat adapter)."""
    return [{"role": "user", "content": text}]


def find_conversation_column(columns) -> str | None:
    """``messages`` or ``conversations`` when ``columns`` has one (the first found)."""
    return next((name for name in CONVERSATION_COLUMNS if name in columns), None)
