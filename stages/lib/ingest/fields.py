"""From a record as a data file has it to what the templates render: its kind, and its text, instruction fields
or conversation.

Field names: `render.fields` (and a source's own `fields`) name the file's fields for ours; a field it does not
name is looked up under our name, and for chat data under the usual alternatives too (`messages` or ShareGPT's
`conversations`, `role` or `from`, `content` or `value`).

Roles: the common names are known (KNOWN_ROLES: ShareGPT's human/gpt, OpenAssistant's prompter, Gemma's model,
bot, tool-calling data's function_call/observation, ...); `render.roles` adds to them or overrides them. Matching
ignores case.

Content given as a list of parts (`[{"type": "text", "text": ...}]`, the OpenAI and HuggingFace multimodal shape)
keeps its text parts, joined without a separator; any other part (an image, audio) makes the record unusable, with
the part's type in the message.

Tool calls: an assistant message's `tool_calls` (OpenAI/HuggingFace shape), or a `tool_call` turn (ShareGPT's
function_call) whose content is the call as JSON (`{"name", "arguments"}`, or a list of them), become an
assistant message with `tool_calls: [{"type": "function", "function": {"name", "arguments"}}]` (and the call's
`id` when it has one), arguments parsed from JSON when they are a JSON string; `tool` turns are tool results
(with their `name` and `tool_call_id` when given). A record's `tools` (a list of definitions,
or a JSON string of one) go with the conversation.

Every reader returns the names of the fields that nothing used (`Read.dropped`), for stats.json.
"""

import json
from dataclasses import dataclass
from typing import Any

from stages.lib.base.params import ROLE_NAMES, FieldNames
from stages.lib.ingest.readers import RecordError

KNOWN_ROLES = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool", "tool_response": "tool",
    "function_call": "tool_call", "tool_call": "tool_call",
}
TEXT_PARTS = ("text", "input_text", "output_text")  # part types that hold text (OpenAI's Responses API adds two)
KINDS = ("text", "instruction", "chat", "preference")


@dataclass(frozen=True)
class Mapping:
    """The field names to look for, in order, and the role map, for one source."""

    text: tuple[str, ...]
    instruction: tuple[str, ...]
    input: tuple[str, ...]
    output: tuple[str, ...]
    messages: tuple[str, ...]
    role: tuple[str, ...]
    content: tuple[str, ...]
    tools: tuple[str, ...]
    prompt: tuple[str, ...]
    chosen: tuple[str, ...]
    rejected: tuple[str, ...]
    roles: tuple[tuple[str, str], ...]

    @classmethod
    def build(cls, fields: FieldNames, own: FieldNames | None = None, roles: dict | None = None) -> "Mapping":
        """The mapping from render.fields, a source's own fields (which win) and render.roles."""
        defaults = {"text": ("text",), "instruction": ("instruction",), "input": ("input",), "output": ("output",),
                    "messages": ("messages", "conversations"), "role": ("role", "from"),
                    "content": ("content", "value"), "tools": ("tools",), "prompt": ("prompt",),
                    "chosen": ("chosen",), "rejected": ("rejected",)}
        names = {}
        for key, ours in defaults.items():
            given = (own and getattr(own, key)) or getattr(fields, key)
            names[key] = tuple(dict.fromkeys(((given,) if given else ()) + ours))
        known = {**KNOWN_ROLES, **{k.lower(): v for k, v in (roles or {}).items()}}
        return cls(**names, roles=tuple(sorted(known.items())))

    def columns(self, kind: str) -> tuple[str, ...]:
        """Every field name a record of `kind` may be read from."""
        if kind == "text":
            return self.text
        if kind == "instruction":
            return self.instruction + self.input + self.output
        if kind == "preference":
            return self.prompt + self.messages + self.chosen + self.rejected + self.tools
        return self.messages + self.tools


@dataclass(slots=True)
class Read:
    """What a record holds for the templates, and the fields nothing read."""

    value: Any  # text: str; instruction: (instruction, input, output); chat: list of messages
    dropped: list[str]
    tools: list | None = None


def detect_kind(record: Any, m: Mapping) -> str | None:
    """'preference', 'chat', 'instruction', 'text' or None (not a shape we know) for one record."""
    if isinstance(record, list):
        return "chat"
    if isinstance(record, str):
        return "text"
    if not isinstance(record, dict):
        return None
    if _first(record, m.chosen) and _first(record, m.rejected):
        return "preference"
    if _first(record, m.messages):
        return "chat"
    if _first(record, m.instruction) or _first(record, m.output):
        return "instruction"
    return "text" if _first(record, m.text) else None


def unknown_shape(record: Any) -> str:
    """Why a record of no known shape cannot be used, naming its fields and how to map them."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {json_type(record)}"
    keys = ", ".join(f"'{k}'" for k in list(record)[:8]) or "none"
    return (f"a record that is neither chat data ('messages' or 'conversations'), instruction data ('instruction' "
            f"and 'output') nor text ('text'); its fields are {keys}: name yours in render.fields, e.g. "
            "fields: {instruction: question, output: answer}")


def read_text(record: Any, m: Mapping) -> Read:
    """The text of a plain text record: a string, or an object with a text field."""
    if isinstance(record, str):
        return Read(record, [])
    key = _need(record, m.text, "text data")
    return Read(_string(field_value(record, key), f"field '{key}'"), _dropped(record, {key}))


def read_instruction(record: Any, m: Mapping) -> Read:
    """(instruction, input, output) of an instruction record; a missing or null input is empty."""
    instruction, output = _need(record, m.instruction, "instruction data"), _need(record, m.output, "instruction data")
    given = _first(record, m.input)
    values = (_string(field_value(record, instruction), f"field '{instruction}'"),
              _string(field_value(record, given), f"field '{given}'") if given else "",
              _string(field_value(record, output), f"field '{output}'"))
    used = (instruction, given, output)
    if any("." in k for k in used if k):  # a dotted path: the record's own key is its first part
        used = tuple(_own_key(record, k) for k in used)
    return Read(values, [k for k, v in record.items() if v is not None and k not in used] if len(record) > 2 else [])


def read_chat(record: Any, m: Mapping) -> Read:
    """The messages of a conversation: a bare list of messages, or an object with a messages field."""
    if isinstance(record, list):
        key, turns, dropped, tools = "messages", record, [], None
    else:
        key = _need(record, m.messages, "chat data")
        turns = field_value(record, key)
        tools_key = _first(record, m.tools)
        tools = _tools(field_value(record, tools_key), tools_key) if tools_key else None
        dropped = _dropped(record, {key, tools_key})
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"field '{key}' should be a non-empty list of messages, got {json_type(turns)}")
    roles = dict(m.roles)
    messages = [_message(turn, f"{key}[{i}]", m, roles, dropped, key) for i, turn in enumerate(turns)]
    return Read(messages, dropped, tools)


def _message(turn: Any, where: str, m: Mapping, roles: dict, dropped: list, key: str) -> dict:
    if not isinstance(turn, dict):
        raise RecordError(f"{where} is {json_type(turn)}; expected an object with a role and a content")
    role_key, content_key = _first(turn, m.role), _first(turn, m.content)
    if role_key is None:
        raise RecordError(f"{where} has no '{m.role[0]}'")
    raw_role = turn[role_key]
    role = roles.get(raw_role.lower()) if isinstance(raw_role, str) else None
    if role is None:
        raise RecordError(f"{where} has unknown {role_key} {raw_role!r}; expected one of {', '.join(ROLE_NAMES)} or "
                          "a known name (human, gpt, bot, model, ...); map others in render.roles, e.g. "
                          f"roles: {{{raw_role}: assistant}}")
    used = {role_key, content_key}
    message = {"role": role}
    if role == "tool_call":
        if content_key is None:
            raise RecordError(f"{where} has no '{m.content[0]}' (the tool call as JSON)")
        message = {"role": "assistant", "content": "", "tool_calls": _calls(turn[content_key], where)}
    else:
        calls = turn.get("tool_calls") if role == "assistant" else None
        if calls is not None:
            used.add("tool_calls")
            message["tool_calls"] = _calls(calls, where)
        if content_key is None or (turn[content_key] is None and calls is not None):
            if calls is None:
                raise RecordError(f"{where} has no '{m.content[0]}'")
            message["content"] = ""
        else:
            message["content"] = _content(turn[content_key], f"{where}.{content_key}")
        for extra in ("name", "tool_call_id"):
            if role == "tool" and isinstance(turn.get(extra), str):
                used.add(extra)
                message[extra] = turn[extra]
    dropped.extend(f"{key}[].{k}" for k, v in turn.items() if k not in used and v is not None)
    return message


def _content(value: Any, where: str) -> str:
    """A message's text: a string, or the text parts of a list of parts."""
    if isinstance(value, str):
        return lf(value)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RecordError(f"{where} is {json_type(value)}; expected a string or a list of parts")
    texts = []
    for i, part in enumerate(value):
        kind = part.get("type", "text") if isinstance(part, dict) else None
        if kind in TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part, str):
            texts.append(part)
        else:
            what = f"of type {kind!r}" if isinstance(kind, str) else json_type(part)
            raise RecordError(f"{where}[{i}] is a content part {what}; only text parts can be trained on here")
    return lf("".join(texts))


def _calls(value: Any, where: str) -> list[dict]:
    """Tool calls in the OpenAI/HuggingFace shape, from a list of calls, one call, or its JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RecordError(f"{where} should hold a tool call as JSON ({{\"name\": ..., \"arguments\": ...}}), "
                              f"got {value[:60]!r}") from None
    calls = value if isinstance(value, list) else [value]
    result = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RecordError(f"{where} has a tool call without a name; expected {{\"name\": ..., \"arguments\": "
                              "...}}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass  # arguments that are not JSON stay text
        call_id = {"id": call["id"]} if isinstance(call, dict) and isinstance(call.get("id"), str) else {}
        result.append({**call_id, "type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return result


def _tools(value: Any, key: str) -> list | None:
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise RecordError(f"field '{key}' is text that is not JSON ({err.msg}); expected a list of tool "
                              "definitions") from None
    if value is None or value == []:
        return None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RecordError(f"field '{key}' is {json_type(value)}; expected a list of tool definitions (objects)")
    return value


def _first(record: dict, names: tuple[str, ...]) -> str | None:
    """The first of `names` the record has (with a value that is not null); a dotted name is a path into it."""
    for name in names:  # a loop, not next() over a generator: this runs several times per record
        if record.get(name) is not None or ("." in name and field_value(record, name) is not None):
            return name
    return None


def field_value(record: dict, name: str) -> Any:
    """The value of field `name`: a key of the record, or a dotted path into nested objects (`a.b.c`)."""
    value = record.get(name)
    if value is not None or "." not in name or name in record:
        return value
    value = record
    for key in name.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def with_field(record: dict, name: str, value: Any) -> dict:
    """A copy of the record with field `name` (a key or a dotted path) set to `value`; the record is unchanged."""
    if name in record or "." not in name:
        return {**record, name: value}
    head, rest = name.split(".", 1)
    return {**record, head: with_field(record[head], rest, value)}


def conversation_list(record: Any, m: Mapping) -> tuple[str, list] | None:
    """(field, conversations) when a record's messages field holds a list of conversations (lists of messages),
    which render as one record each; None for a record of one conversation or of another kind."""
    if not isinstance(record, dict):
        return None
    key = _first(record, m.messages)
    turns = field_value(record, key) if key else None
    if isinstance(turns, list) and turns and all(isinstance(t, list) for t in turns):
        return key, turns
    return None


def _need(record: Any, names: tuple[str, ...], what: str) -> str:
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object ({what}), got {json_type(record)}")
    key = _first(record, names)
    if key is None:
        raise RecordError(f"missing field '{names[0]}' ({what} needs it)")
    return key


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{what} is {json_type(value)}; expected a string")
    return value.replace("\r\n", "\n") if "\r" in value else value


def _dropped(record: dict, used: set) -> list[str]:
    if any(k and "." in k for k in used):
        used = {_own_key(record, k) for k in used}
    return [k for k, v in record.items() if k not in used and v is not None]


def _own_key(record: dict, name: str | None) -> str | None:
    """The record's own key a field is read from (the first part of a dotted path)."""
    return name if name is None or name in record or "." not in name else name.split(".", 1)[0]


def lf(text: str) -> str:
    """CRLF line endings made LF."""
    return text.replace("\r\n", "\n")


def json_type(value: Any) -> str:
    """A JSON value's type in words."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "a number",
             float: "a number", type(None): "null", bytes: "bytes"}
    return names.get(type(value), type(value).__name__)
