"""Generate command: talk to the exported model, with the prompt template it was trained on.

    python -m stages.generate --prompt "Add 3 and 4."     # one answer, streamed
    python -m stages.generate                               # interactive: one message per line, Ctrl-D to quit

The prompt is built exactly as the render stage built the training prompts (`stages.templates`):
- `chat`: the conversation so far through the chat template the training data used (the tokenizer's own, or
  ChatML); interactive mode keeps the conversation (type `/reset` to start over);
- `instruction`: the Alpaca template, each message a new instruction;
- `text`: no template, the model continues the text (models trained on plain text).
`--chat` / `--no-chat` / `--raw` choose; by default it follows `data/rendered/stats.json` (the templates the
training data used) when it exists, else the tokenizer (a chat template -> chat, none -> instruction).

Decoding: `--temperature 0` is greedy (deterministic); otherwise sampling with `--top-k` / `--top-p`, seeded by
`--seed` for repeatable answers. It stops at EOS and at the end-of-turn token of chat templates (`<|im_end|>`...).
The functions here (loading the export, building prompts, batched generation) are also used by the evaluate stage.
"""

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, TextStreamer
from transformers.utils import logging as hf_logging

from stages import templates
from stages.errors import UserError, run_stage
from stages.distributed import pick_device
from stages.params import MODELS_DIR, PARAMS_FILE, RENDERED_DIR, load_params



@dataclass
class Decoding:
    """How to pick the next token. temperature 0 = greedy; top_k 0 and top_p 1 switch those filters off."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0


def load_model(model_dir: str | Path, trust_remote_code: bool = False, device: str = "auto"):
    """Load an exported model folder and its tokenizer with from_pretrained; return (model, tokenizer)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} holds no exported model (no config.json): run the train stage first "
                        "(`dvc repro train`, or `python -m stages.train`), or pass the folder of an exported model")
    torch_device = pick_device(device)
    hf_logging.disable_progress_bar()  # a bar per weight file is noise here
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if torch_device.type == "cpu":
        model = model.float()  # bf16 matmuls are very slow on CPUs
    model.to(torch_device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise UserError(f"{model_dir}: the tokenizer has no EOS token, so generation could never stop; "
                        "re-export the model with the tokenizer from data/tokenizer")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out; any id will do
    return model, tokenizer


def instruction_prompt(instruction: str, input: str = "", template: str = "alpaca", tokenizer=None) -> str:
    """The training prompt for an instruction (and input), as the render stage renders instruction data.

    'alpaca': the Alpaca template's prompt segments; 'chatml' / 'tokenizer' (render.template set to a chat template):
    the instruction as a user turn, then the assistant header.
    """
    if template == "alpaca":
        segments = templates.render_instruction(instruction, input, "")
        return "".join(s["text"] for s in segments if not s["response"])
    question = templates.instruction_as_chat(instruction, input, "")[:1]
    return templates.chat_prompt(question, template, tokenizer)


def instruction_template(render_template: str) -> str:
    """The template the render stage uses for instruction data under render.template (see stages/render.py)."""
    return "alpaca" if render_template in ("auto", "alpaca") else render_template


def chat_prompt(messages: list[dict], template: str, tokenizer) -> str:
    """The training prompt for the next assistant turn of a conversation (template 'chatml' or 'tokenizer')."""
    return templates.chat_prompt(messages, template, tokenizer)


def generate_ids(model, tokenizer, prompts: list[str], decoding: Decoding, streamer=None) -> list[list[int]]:
    """Generate one reply per prompt, in one left-padded batch; return each reply's new token ids, up to the stop."""
    stops = templates.stop_token_ids(tokenizer, model)
    tokenizer.padding_side = "left"  # replies start right after each prompt
    # No special tokens: the tokenize stage encoded the training text the same way.
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    config = _generation_config(decoding, stops, tokenizer.pad_token_id)
    with torch.inference_mode():
        out = model.generate(**batch, generation_config=config, streamer=streamer)
    replies = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        replies.append(row[:cut])
    return replies


def generate_texts(model, tokenizer, prompts: list[str], decoding: Decoding) -> list[str]:
    """Generate one reply per prompt (batched); return the decoded texts without special tokens."""
    return [tokenizer.decode(ids, skip_special_tokens=True)
            for ids in generate_ids(model, tokenizer, prompts, decoding)]


def _generation_config(decoding: Decoding, stops: list[int], pad_id: int) -> GenerationConfig:
    if decoding.temperature == 0:
        sampling = {"do_sample": False}
    else:
        sampling = {"do_sample": True, "temperature": decoding.temperature, "top_k": decoding.top_k,
                    "top_p": decoding.top_p}
    return GenerationConfig(max_new_tokens=decoding.max_new_tokens, eos_token_id=stops, pad_token_id=pad_id,
                            **sampling)


def choose_style(tokenizer, chat: bool | None, raw: bool, rendered_dir: Path = RENDERED_DIR) -> str:
    """'chat', 'instruction' or 'text': what the command line asks, else what the training data used."""
    if raw:
        return "text"
    if chat is not None:
        return "chat" if chat else "instruction"
    used = _templates_used(rendered_dir)
    if used is None:  # no record of the training data: trust the tokenizer
        return "chat" if templates.has_chat_template(tokenizer) else "instruction"
    if any(t in templates.CHAT_TEMPLATES for t in used):
        return "chat"
    return "instruction" if "alpaca" in used else "text"


def choose_chat_template(tokenizer, rendered_dir: Path = RENDERED_DIR) -> str:
    """The chat template training used: as recorded by the render stage, else the tokenizer's own if it has one."""
    used = [t for t in _templates_used(rendered_dir) or [] if t in templates.CHAT_TEMPLATES]
    if used:
        return used[0]
    return "tokenizer" if templates.has_chat_template(tokenizer) else "chatml"


def _templates_used(rendered_dir: Path) -> list[str] | None:
    stats = Path(rendered_dir) / "stats.json"
    if not stats.is_file():
        return None
    return json.loads(stats.read_text(encoding="utf-8")).get("templates")


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
