"""Generate command: talk to the exported model, with the prompt template it was trained on.

    python -m stages.generate --prompt "Add 3 and 4."     # one answer, streamed
    python -m stages.generate                               # interactive: one message per line, Ctrl-D to quit

The prompt is built exactly as the render stage built the training prompts (`stages/lib/ingest/chat_templates.py`):
- `chat`: the conversation so far through the chat template the training data used (the tokenizer's own, or
  ChatML); interactive mode keeps the conversation (type `/reset` to start over);
- `instruction`: the Alpaca template, each message a new instruction;
- `text`: no template, the model continues the text (models trained on plain text).
`--chat` / `--no-chat` / `--raw` choose; by default it follows `data/rendered/stats.json` (the templates the
training data used) when it exists, else the tokenizer (a chat template -> chat, none -> instruction).

Decoding: `--temperature 0` is greedy (deterministic); otherwise sampling with `--top-k` / `--top-p`, seeded by
`--seed` for repeatable answers. It stops at EOS and at the end-of-turn token of chat templates (`<|im_end|>`...).
Loading the export, building prompts and batched generation live in stages/lib/modeling/inference.py (the evaluate stage
uses them too).
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import TextStreamer

from stages.lib.base.errors import UserError, run_stage
from stages.lib.base.params import MODELS_DIR, PARAMS_FILE, load_params
from stages.lib.modeling.inference import (
    Decoding,
    chat_prompt,
    choose_chat_template,
    choose_style,
    generate_ids,
    instruction_prompt,
    load_model,
)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", help="answer this one message and exit; without it: interactive")
    parser.add_argument("--model", help="exported model folder (default: models/<train.model_name>)")
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="use the chat template (--no-chat: the Alpaca instruction template); default: as trained")
    parser.add_argument("--raw", action="store_true", help="no template: continue the text as given")
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0: off")
    parser.add_argument("--top-p", type=float, default=0.95, help="sample within this probability mass; 1: off")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, help="seed the sampling for repeatable answers")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = parser.parse_args(argv)
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        parser.error("expected --temperature >= 0, --top-k >= 0, 0 < --top-p <= 1, --max-new-tokens >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    """Load the model, then answer --prompt, or chat over stdin."""
    args = _parse_args(argv)
    model_dir, trust_remote_code = _model_source(args.model)
    model, tokenizer = load_model(model_dir, trust_remote_code, args.device)
    style = choose_style(tokenizer, args.chat, args.raw)
    template = choose_chat_template(tokenizer) if style == "chat" else ""
    decoding = Decoding(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    session = Conversation(model, tokenizer, style, template, decoding, args.seed)
    if args.prompt is not None:
        session.reply(args.prompt)
        return
    print(f"{model_dir} ({style} prompts). One message per line; /reset forgets the conversation; Ctrl-D quits.",
          file=sys.stderr)
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input (Ctrl-D)
            break
        line = line.strip()
        if line == "/reset":
            session.messages.clear()
        elif line:
            session.reply(line)


def _model_source(model_arg: str | None) -> tuple[Path, bool]:
    """The model folder and whether its tokenizer may run remote code, from the command line and params.yaml."""
    if model_arg is None and not Path(PARAMS_FILE).exists():
        raise UserError(f"no --model given and no {PARAMS_FILE} here: run from the repository root, "
                        "or pass --model <exported model folder>")
    params = load_params() if Path(PARAMS_FILE).exists() else None
    model_dir = Path(model_arg) if model_arg else MODELS_DIR / params.train.model_name
    return model_dir, bool(params and params.tokenizer.trust_remote_code)


class Conversation:
    """The messages so far; each reply is generated from the whole conversation (chat) or the message alone."""

    def __init__(self, model, tokenizer, style: str, template: str, decoding: Decoding, seed: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.style, self.template, self.decoding, self.seed = style, template, decoding, seed
        self.messages: list[dict] = []

    def prompt_for(self, message: str) -> str:
        """The prompt the model sees for this message (the conversation grows only in chat style)."""
        if self.style == "text":
            return message
        if self.style == "instruction":
            return instruction_prompt(message)
        return chat_prompt(self._fit(self.messages + [{"role": "user", "content": message}]), self.template,
                           self.tokenizer)

    def reply(self, message: str, stream: bool = True) -> str:
        """Generate, stream to stdout, remember (chat) and return the reply."""
        prompt = self.prompt_for(message)
        if self.seed is not None:
            torch.manual_seed(self.seed)
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        ids = generate_ids(self.model, self.tokenizer, [prompt], self.decoding, streamer)[0]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if self.style == "chat":
            self.messages += [{"role": "user", "content": message}, {"role": "assistant", "content": text}]
        return text

    def _fit(self, messages: list[dict]) -> list[dict]:
        """Drop the oldest exchanges until the prompt and the reply fit in the model's context."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        while limit and len(messages) > 1:
            prompt = chat_prompt(messages, self.template, self.tokenizer)
            if len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]) + self.decoding.max_new_tokens \
                    <= limit:
                break
            first = 1 if messages[0]["role"] == "system" else 0
            if len(messages) - first <= 1:
                break
            del messages[first:first + 2]
        return messages


if __name__ == "__main__":
    run_stage(main)
