"""Preference pairs: one prompt and two answers to it, the chosen (preferred) one and the rejected one, read from the
shapes people keep them in and rendered with the same templates as chat and instruction data.

Shapes (field names through render.fields: prompt, chosen, rejected, messages):
- TRL's standard form: prompt, chosen and rejected as strings.
- TRL's conversational form (UltraFeedback binarized): the prompt as a string or as messages, chosen and rejected
  as lists of messages; an answer that repeats the prompt's turns before its own has them removed.
- LLaMA-Factory's ShareGPT form: the prompt in `conversations` (or `messages`), chosen and rejected one message
  each (or lists of them).
- An implicit prompt: no prompt field, and chosen and rejected are whole transcripts sharing the prompt. Strings
  (Anthropic HH) are cut after the last "\\n\\nAssistant:" of their common beginning; lists of messages after their
  last shared turn that precedes an assistant turn.

Templates: string pairs are used as they are under render.template auto (TRL does the same: its standard form is
text already, HH's transcripts included), with the Alpaca prompt under alpaca, and as a user turn and an assistant
turn under chatml or tokenizer; pairs of messages get the chat template. The prompt is the text that asks for the
answer (the generation prompt); each answer is what the template writes after it, its response segments marked.

A rendered pair is one line of records.jsonl: {"source", "kind": "preference", "prompt": segments, "chosen":
segments, "rejected": segments} (docs/formats.md): the prompt's segments are all prompt text, and every segment keeps
the template's control marks (the special tokens it wrote).

Suspicious pairs, counted in stats.json: identical answers (nothing to prefer), an empty answer, and prompts that
differ (chosen and rejected transcripts, or answers that repeat the prompt, disagree on it: the chosen one's prompt
is used).
"""

import os
from dataclasses import dataclass, field
from typing import Any

from stages.lib.base.errors import UserError
from stages.lib.ingest import chat_templates as templates
from stages.lib.ingest.fields import Mapping, Read, _dropped, _first, _message, _need, _string, field_value, json_type
from stages.lib.ingest.readers import RecordError
from stages.lib.tokenizing.records import CONTROL_KEY

HH_TURN = "\n\nAssistant:"  # where an Anthropic HH transcript's assistant turn begins
ASKING_ROLES = ("system", "user")  # the turns that belong to a prompt, never to an answer


@dataclass
class Pair:
    """A preference record as read: the prompt (text, messages or None until split) and the two answers."""

    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]
    prompts_differ: bool = False
    rendered: dict = field(default_factory=dict)  # prompt text and answer segments, once rendered


def read_preference(record: Any, m: Mapping) -> Read:
    """A Pair from one record of any shape the module docstring lists."""
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object with chosen and rejected answers, got {json_type(record)}")
    chosen_key = _need(record, m.chosen, "a preference pair")
    rejected_key = _need(record, m.rejected, "a preference pair")
    prompt_key = _first(record, m.prompt) or _first(record, m.messages)
    dropped: list[str] = []
    roles = dict(m.roles)
    chosen, rejected = (_value(field_value(record, k), k, m, roles, dropped) for k in (chosen_key, rejected_key))
    prompt = _value(field_value(record, prompt_key), prompt_key, m, roles, dropped) if prompt_key else None
    pair = _split(prompt, chosen, rejected)
    return Read(pair, dropped + _dropped(record, {chosen_key, rejected_key, prompt_key}))


def _value(value: Any, key: str, m: Mapping, roles: dict, dropped: list) -> str | list[dict]:
    """A string, or messages from a list of them or one message."""
    if isinstance(value, str):
        return _string(value, f"field '{key}'")
    turns = [value] if isinstance(value, dict) else value
    if not isinstance(turns, list):
        raise RecordError(f"field '{key}' is {json_type(value)}; expected a string, a message or a list of messages")
    return [_message(turn, f"{key}[{i}]", m, roles, dropped, key) for i, turn in enumerate(turns)]


def _split(prompt: str | list | None, chosen: str | list, rejected: str | list) -> Pair:
    """The pair with its prompt apart from both answers."""
    if prompt is None:
        if isinstance(chosen, str) and isinstance(rejected, str):
            return _split_transcripts(chosen, rejected)
        if isinstance(chosen, str) or isinstance(rejected, str):
            raise RecordError("chosen and rejected are one a string and one messages, and there is no prompt field "
                              "to tell the prompt by; give both in the same form")
        prompt, chosen, rejected = _split_shared_turns(chosen, rejected)
    if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
        return Pair(prompt, chosen, rejected)
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    answers, differ = [], False
    for answer in (chosen, rejected):
        if isinstance(answer, str):
            answer = [{"role": "assistant", "content": answer}]
        asked = max((i + 1 for i, turn in enumerate(answer) if turn["role"] in ASKING_ROLES), default=0)
        # An answer that repeats the conversation (UltraFeedback) holds the prompt's turns before its own.
        differ |= asked > 0 and answer[:asked] != prompt[-asked:]
        answers.append(answer[asked:] or [{"role": "assistant", "content": ""}])
    return Pair(prompt, *answers, prompts_differ=differ)


def _split_transcripts(chosen: str, rejected: str) -> Pair:
    """Anthropic HH: the prompt is the shared beginning up to and including its last "\\n\\nAssistant:"."""
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(HH_TURN)
    if cut < 0:
        raise RecordError("the record has no prompt field and its chosen and rejected texts share no beginning that "
                          "ends with '\\n\\nAssistant:' (Anthropic HH transcripts); name the prompt field in "
                          "render.fields, e.g. fields: {prompt: question}")
    end = cut + len(HH_TURN)
    # Each transcript's own last assistant turn should start where the shared prompt ends.
    differ = chosen.rfind(HH_TURN) != cut or rejected.rfind(HH_TURN) != cut
    return Pair(chosen[:end], chosen[end:], rejected[end:], prompts_differ=differ)


def _split_shared_turns(chosen: list[dict], rejected: list[dict]) -> tuple[list, list, list]:
    """TRL's implicit prompt: the turns both conversations share, ending before an assistant turn of the chosen."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared > 0 and not (shared < len(chosen) and chosen[shared]["role"] == "assistant"):
        shared -= 1
    if shared == 0:
        raise RecordError("the record has no prompt field and its chosen and rejected conversations share no turn "
                          "before an assistant answer; name the prompt field in render.fields, e.g. fields: "
                          "{prompt: question}")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def render_pair(pair: Pair, file: str, chooser: Any) -> tuple[list[dict], str | None]:
    """Render the pair into pair.rendered; return (every segment, for counting characters; the template used).

    `chooser`: stages/lib/ingest/convert.py's TemplateChooser (render.template, the tokenizer when needed).
    """
    wanted = chooser.params.render.template
    if isinstance(pair.prompt, str) and wanted in ("auto", "alpaca"):
        template = "alpaca" if wanted == "alpaca" else None
        prompt = [templates.segment(templates.alpaca_prompt(pair.prompt) if template else pair.prompt, False)]
        answers = [[templates.segment(a, True)] for a in (pair.chosen, pair.rejected)]
    else:
        prompt_turns, chosen, rejected = _as_messages(pair)
        template = chooser.for_chat(file)
        tokenizer = chooser.tokenizer if template == "tokenizer" else None
        try:
            asked = templates.chat_prompt(prompt_turns, template, tokenizer)
            (prompt, first), (_, second) = (_cut(templates.render_chat(prompt_turns + a, template, tokenizer), asked)
                                            for a in (chosen, rejected))
        except templates.TemplateError:
            raise
        except UserError as err:  # the chat template refused this conversation
            raise RecordError(str(err)) from None
        answers = [first, second]
    pair.rendered = {"prompt": prompt, "chosen": answers[0], "rejected": answers[1]}
    return [*prompt, *answers[0], *answers[1]], template


def _as_messages(pair: Pair) -> tuple[list[dict], ...]:
    def turns(value, role):
        return [{"role": role, "content": value}] if isinstance(value, str) else value
    return turns(pair.prompt, "user"), turns(pair.chosen, "assistant"), turns(pair.rejected, "assistant")


def _cut(segments: list[dict], prompt: str) -> tuple[list[dict], list[dict]]:
    """A whole rendering as (the prompt's segments, all prompt text, and the answer's that follow), each segment's
    control marks kept on its side of the cut."""
    if not "".join(s["text"] for s in segments).startswith(prompt):
        raise RecordError("the chat template writes the prompt differently when an answer follows it, so the answer "
                          "cannot be told apart; set render.template: chatml")
    head, tail, at = [], [], 0
    for s in segments:
        end = at + len(s["text"])
        if at < len(prompt):
            head.append(_piece(s, 0, min(end, len(prompt)) - at, response=False))
        if end > len(prompt):
            tail.append(_piece(s, max(0, len(prompt) - at), len(s["text"]), s["response"]))
        at = end
    return head, tail


def _piece(s: dict, start: int, end: int, response: bool) -> dict:
    """Characters [start, end) of segment `s`, with the control ranges that fall inside them."""
    control = [(max(a, start) - start, min(b, end) - start) for a, b in s.get(CONTROL_KEY, ())
               if a < end and b > start]
    return templates.segment(s["text"][start:end], response, control or None)


def flag_pair(pair: Pair, where: str, stats: Any) -> bool:
    """Count what is suspicious about a rendered pair; True when an answer is empty (the caller counts that)."""
    answers = [pair.rendered["chosen"], pair.rendered["rejected"]]
    if answers[0] == answers[1]:
        stats.flag("identical_answers", where)
    if pair.prompts_differ:
        stats.flag("prompts_differ", where)
    return any(all(not s["text"].strip() for s in a if s["response"]) for a in answers)
