"""Prompt templates: how an instruction or a conversation becomes text, with the answer parts marked.

The render stage uses these to build training records; evaluate and generate use the same functions to build
prompts, so a model is asked exactly the way it was taught.

A rendering is a list of segments `{"text": str, "response": bool}` (see docs/formats.md): `response: true`
marks text the model learns to produce.

Alpaca (instruction data): the standard Stanford Alpaca prompt. With an input:

    Below is an instruction that describes a task, paired with an input that provides further context. Write a
    response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Input:
    {input}

    ### Response:
    {output}

and without one (empty, whitespace only or missing) the shorter form without the `### Input:` block. Everything up
to and including "### Response:\\n" is prompt; the output is the response.

ChatML (chat data): each message is `<|im_start|>{role}\n{content}<|im_end|>\n`. In an assistant turn the
header `<|im_start|>assistant\n` is prompt, `{content}<|im_end|>` is the response (so the model learns to close
its turn), and the final "\n" is prompt again. Tool calling, in the Hermes style most open models use:
- the conversation's tool definitions join the system message (one is added first when there is none) as
  `# Tools\n<tools>\n{one JSON definition per line}\n</tools>`, after the system text and a blank line;
- an assistant turn's tool calls follow its text (after a newline when there is text), each as
  `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`, calls separated by a newline; they are response;
- a tool result is a turn of role `tool`: `<|im_start|>tool\n{content}<|im_end|>\n`, prompt like any other.
JSON is written with `json.dumps(value, ensure_ascii=False)`, as the chat template's `tojson` filter writes it.

Tokenizer (chat data): the chat template shipped with a HuggingFace tokenizer. Its response spans are found by
rendering prefixes of the conversation: messages[:i] with add_generation_prompt=True is the prompt up to
assistant turn i, and rendering messages[:i+1] extends that text by exactly the response. A template for which
this does not hold (it rewrites earlier turns depending on what follows) is refused: use ChatML instead. Tool
definitions go to the template as `tools=` when its text mentions `tools`; a conversation with tool calls needs a
template that mentions `tool_calls`.
"""

import json
import re
from typing import Any

from stages.lib.base.errors import UserError
from stages.lib.tokenizing.records import CONTROL_KEY

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

CHATML_START = "<|im_start|>"
CHATML_END = "<|im_end|>"
# Tokens that end an assistant turn in common chat templates; generation stops at them as at EOS.
END_OF_TURN_TOKENS = (CHATML_END, "<|end|>", "<|eot_id|>", "<end_of_turn>")
CHATML_SPECIAL_TOKENS = [CHATML_START, CHATML_END]

CHAT_ROLES = ("system", "user", "assistant", "tool")
CHAT_TEMPLATES = ("chatml", "tokenizer")


class TemplateError(UserError):
    """A tokenizer chat template that cannot be split into prompt and response parts."""


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for an instruction (and optional input), ending with '### Response:\\n'."""
    if input.strip():
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def render_instruction(instruction: str, input: str, output: str) -> list[dict]:
    """Alpaca segments for one example: the prompt, then the output as the response (kept even when empty)."""
    return [segment(alpaca_prompt(instruction, input), False), segment(output, True)]


def instruction_as_chat(instruction: str, input: str, output: str) -> list[dict]:
    """An instruction example as a two-message conversation, for rendering instruction data with a chat template."""
    question = f"{instruction}\n\n{input}" if input.strip() else instruction
    return [{"role": "user", "content": question}, {"role": "assistant", "content": output}]


def render_chat(messages: list[dict], template: str, tokenizer: Any = None, tools: list | None = None) -> list[dict]:
    """Segments for a conversation (`[{role, content}]`, tool calls allowed) with template "chatml" or "tokenizer"."""
    if template == "chatml":
        return _chatml_segments(with_tools(messages, tools))
    if template == "tokenizer":
        return _tokenizer_segments(messages, _require_chat_template(tokenizer), tools)
    raise ValueError(f"unknown chat template {template!r}; expected one of {CHAT_TEMPLATES}")


def chat_prompt(messages: list[dict], template: str, tokenizer: Any = None, tools: list | None = None) -> str:
    """The prompt text that asks the model for the next assistant turn after `messages`."""
    if template == "chatml":
        return "".join(_chatml_message(m) for m in with_tools(messages, tools)) + f"{CHATML_START}assistant\n"
    if template == "tokenizer":
        return _apply(_require_chat_template(tokenizer), messages, generation_prompt=True, tools=tools)
    raise ValueError(f"unknown chat template {template!r}; expected one of {CHAT_TEMPLATES}")


def accepts(tokenizer: Any, what: str) -> bool:
    """Whether a tokenizer's chat template can render `what` ('tools' or 'tool_calls'): its text mentions it."""
    return what in str(getattr(tokenizer, "chat_template", None) or "")


def with_tools(messages: list[dict], tools: list | None) -> list[dict]:
    """The conversation with its tool definitions written into the system message, as ChatML renders them."""
    if not tools:
        return messages
    block = "# Tools\n<tools>\n" + "\n".join(_json(tool) for tool in tools) + "\n</tools>"
    if messages and messages[0]["role"] == "system":
        text = messages[0]["content"]
        return [{**messages[0], "content": f"{text}\n\n{block}" if text else block}, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


def has_chat_template(tokenizer: Any) -> bool:
    """Whether a HuggingFace tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def segment(text: str, response: bool, control: list | None = None) -> dict:
    """One segment in the records format; `control`: the [start, end) ranges of its text the template wrote as
    special tokens (stages/lib/tokenizing/special_tokens.py), kept when not None."""
    if control is None:
        return {"text": text, "response": response}
    return {"text": text, "response": response, CONTROL_KEY: [list(pair) for pair in control]}


def _chatml_message(message: dict) -> str:
    return f"{CHATML_START}{message['role']}\n{_chatml_content(message)}{CHATML_END}\n"


def _chatml_content(message: dict) -> str:
    """A message's text, followed by its tool calls."""
    calls = [f"<tool_call>\n{_json({'name': c['function']['name'], 'arguments': c['function']['arguments']})}"
             "\n</tool_call>" for c in message.get("tool_calls") or ()]
    return "\n".join(([message["content"]] if message["content"] else []) + calls)


def _chatml_segments(messages: list[dict]) -> list[dict]:
    """ChatML segments, its tags marked as control text (a message's own text may spell them: that stays data)."""
    start, end = [(0, len(CHATML_START))], lambda at: [(at, at + len(CHATML_END))]
    parts = []
    for message in messages:
        content = _chatml_content(message)
        if message["role"] == "assistant":
            parts += [(f"{CHATML_START}assistant\n", False, start), (f"{content}{CHATML_END}", True, end(len(content))),
                      ("\n", False, [])]
        else:
            head = f"{CHATML_START}{message['role']}\n"
            parts.append((f"{head}{content}{CHATML_END}\n", False, start + end(len(head) + len(content))))
    return _join(parts)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _tokenizer_segments(messages: list[dict], tokenizer: Any, tools: list | None = None) -> list[dict]:
    """The template's segments, each special token it wrote marked as control text.

    When the conversation's own text spells a special token, the template is applied to a copy where each such
    token is a placeholder character, so that every special token in its output is the template's; the
    placeholders are then put back. A template that does not give the same text that way (it inspects or
    rewrites the text) has every special token in its output marked, as before control marks existed.
    """
    specials = _special_texts(tokenizer)
    table = _placeholders(specials, messages, tools)
    if not table:
        return _marked(_plain_tokenizer_segments(messages, tokenizer, tools), specials, {})
    defused = _plain_tokenizer_segments(_replaced(messages, table), tokenizer, _replaced(tools, table))
    marked = _marked(defused, specials, {char: text for text, char in table.items()})
    text, full = "".join(s["text"] for s in marked), _apply(tokenizer, messages, generation_prompt=False, tools=tools)
    eos = getattr(tokenizer, "eos_token", None) or ""
    if full == text or (eos and full == text + eos):  # the closing EOS is dropped from the segments
        return marked
    return _marked(_plain_tokenizer_segments(messages, tokenizer, tools), specials, {})


def _special_texts(tokenizer: Any) -> list[str]:
    """The tokenizer's special tokens' texts (its added tokens marked special), longest first."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return sorted({t.content for t in added.values() if t.special and t.content}, key=len, reverse=True)


def _placeholders(specials: list[str], messages: list[dict], tools: list | None) -> dict[str, str]:
    """Special token text -> a private-use character the conversation does not hold, for each special token the
    conversation's text spells; {} when it spells none (nearly always)."""
    every = _json([messages, tools])
    spelled = [text for text in specials if text in every]
    if not spelled:
        return {}
    free = (chr(c) for c in range(0xE000, 0xF900) if chr(c) not in every)
    return {text: next(free) for text in spelled}


def _replaced(value: Any, table: dict[str, str]) -> Any:
    """`value` (messages, tools) with every string's special token texts replaced as `table` says, longest first."""
    if isinstance(value, str):
        for text, char in table.items():
            value = value.replace(text, char)
        return value
    if isinstance(value, list):
        return [_replaced(v, table) for v in value]
    if isinstance(value, dict):
        return {k: _replaced(v, table) for k, v in value.items()}
    return value


def _marked(segments: list[dict], specials: list[str], back: dict[str, str]) -> list[dict]:
    """The segments with each special token in their text marked as control text, and the placeholder characters
    of `back` turned back into the text they stand for. Every chat record carries the mark, empty when none."""
    pattern = re.compile("|".join(map(re.escape, [*specials, *back]))) if specials or back else None
    out = []
    for s in segments:
        text, control, pieces, shift, at = s["text"], [], [], 0, 0
        for m in pattern.finditer(text) if pattern else ():
            pieces.append(text[at:m.start()])
            if m.group() in back:
                pieces.append(back[m.group()])
                shift += len(back[m.group()]) - 1
            else:
                pieces.append(m.group())
                control.append((m.start() + shift, m.end() + shift))
            at = m.end()
        pieces.append(text[at:])
        out.append(segment("".join(pieces), s["response"], control or None))
    if out and not any(CONTROL_KEY in s for s in out):
        out[0][CONTROL_KEY] = []
    return out


def _plain_tokenizer_segments(messages: list[dict], tokenizer: Any, tools: list | None = None) -> list[dict]:
    full = _apply(tokenizer, messages, generation_prompt=False, tools=tools)
    eos = getattr(tokenizer, "eos_token", None) or ""
    parts, done = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise UserError("the conversation starts with an assistant turn; the tokenizer's chat template needs "
                            "a system or user message before it")
        prompt = _apply(tokenizer, messages[:i], generation_prompt=True, tools=tools)
        through = _apply(tokenizer, messages[: i + 1], generation_prompt=False, tools=tools)
        if not (full.startswith(prompt) and through.startswith(prompt) and len(prompt) >= done):
            raise _unstable(i, "the prompt before it is not how the whole conversation begins")
        end = len(through)
        if not full.startswith(through):
            # Templates such as Phi-3's close the conversation with EOS: after the last turn only.
            if eos and through.endswith(eos) and full.startswith(through[: -len(eos)]):
                end -= len(eos)
            else:
                raise _unstable(i, "rendering the turn does not extend the prompt the same way as the whole "
                                   "conversation does")
        parts += [(full[done:len(prompt)], False), (full[len(prompt):end], True)]
        done = end
    parts.append((full[done:], False))
    return _drop_final_eos(_join(parts), eos)


def _drop_final_eos(segments: list[dict], eos: str) -> list[dict]:
    """Remove a closing EOS the template wrote: the tokenize stage appends EOS after every document itself."""
    if eos and segments and segments[-1]["text"].endswith(eos):
        last = segments[-1]
        last["text"] = last["text"][: -len(eos)]
        if not last["text"] and not last["response"]:
            segments.pop()
    return segments


def _join(parts: list[tuple]) -> list[dict]:
    """Segments from (text, response) or (text, response, control ranges) pieces: neighbouring prompt pieces
    merged, empty prompt pieces dropped."""
    segments: list[dict] = []
    for text, response, *marks in parts:
        control = marks[0] if marks else None
        if not response and not text:
            continue
        if not response and segments and not segments[-1]["response"]:
            last = segments[-1]
            if control:
                last.setdefault(CONTROL_KEY, []).extend([a + len(last["text"]), b + len(last["text"])]
                                                        for a, b in control)
            last["text"] += text
        else:
            segments.append(segment(text, response, control or None))
    return segments


def _apply(tokenizer: Any, messages: list[dict], generation_prompt: bool, tools: list | None = None) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja raise_exception() and friends: the template refuses this conversation
        raise UserError(f"the tokenizer's chat template rejected the conversation: {err}") from None


def _require_chat_template(tokenizer: Any) -> Any:
    if tokenizer is None or not has_chat_template(tokenizer):
        raise TemplateError("template 'tokenizer' needs a HuggingFace tokenizer with a chat template "
                            "(chat_template in tokenizer_config.json or chat_template.jinja); "
                            "this one has none: use render.template: chatml")
    return tokenizer


def _unstable(turn: int, why: str) -> TemplateError:
    return TemplateError(f"the tokenizer's chat template is not prefix-stable at message {turn} (an assistant "
                         f"turn): {why}, so the answer cannot be told apart from the prompt. "
                         "Set render.template: chatml to use ChatML instead")


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """EOS, the end-of-turn tokens the tokenizer has, and the model's own generation_config EOS ids."""
    vocab = tokenizer.get_vocab()
    ids = [tokenizer.eos_token_id] + [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids += configured if isinstance(configured, list) else [configured]
    return sorted(set(ids))
