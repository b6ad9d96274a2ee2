"""Inference on an exported model: loading it, building prompts the way training rendered them, and batched
generation. The generate command and the evaluate stage both use these.

The prompt is built exactly as the render stage built the training prompts (`stages.lib.ingest.chat_templates`), so a
model is asked the way it was taught. Decoding stops at EOS and at the end-of-turn tokens of chat templates
(`<|im_end|>`...).
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.utils import logging as hf_logging

from stages.lib.base.devices import pick_device
from stages.lib.base.errors import UserError
from stages.lib.base.params import RENDERED_DIR
from stages.lib.ingest import chat_templates as templates
from stages.lib.modeling import lora
from stages.lib.modeling.precision import inference_dtype
from stages.lib.tokenizing.records import templates_used


@dataclass
class Decoding:
    """How to pick the next token. temperature 0 = greedy; top_k 0 and top_p 1 switch those filters off."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0


def load_model(model_dir: str | Path, trust_remote_code: bool = False, device: str = "auto"):
    """Load an exported model folder and its tokenizer with from_pretrained; return (model, tokenizer).

    A LoRA adapter exported alone (train.export: adapter) loads on its base, from the path its adapter_config.json
    records, through transformers' PEFT integration; one that trained the embeddings on the base grown to its
    vocabulary (stages/lib/modeling/lora.py).
    """
    model_dir = Path(model_dir)
    adapter = model_dir / "adapter_config.json"
    if not (model_dir / "config.json").is_file() and not adapter.is_file():
        raise UserError(f"{model_dir} holds no exported model (no config.json): run the train stage first "
                        "(`dvc repro train`, or `python -m stages.train`), or pass the folder of an exported model")
    torch_device = pick_device(device)
    hf_logging.disable_progress_bar()  # a bar per weight file is noise here
    try:
        if adapter.is_file() and lora.trains_embeddings(adapter):
            model = lora.adapter_on_its_base(model_dir, trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except OSError as err:
        if not adapter.is_file():
            raise
        base = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
        raise UserError(f"{model_dir} holds a LoRA adapter whose base model, {base!r}, cannot be loaded from here "
                        f"({str(err).splitlines()[0][:200]}): run from the repository root where train.init_from "
                        "points at it, or export the merged model (train.export: merged or both)") from None
    capability = torch.cuda.get_device_capability(torch_device) if torch_device.type == "cuda" else None
    model.to(device=torch_device, dtype=inference_dtype(model.dtype, capability)).eval()
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
    used = templates_used(rendered_dir)
    if used is None:  # no record of the training data: trust the tokenizer
        return "chat" if templates.has_chat_template(tokenizer) else "instruction"
    if any(t in templates.CHAT_TEMPLATES for t in used):
        return "chat"
    return "instruction" if "alpaca" in used else "text"


def choose_chat_template(tokenizer, rendered_dir: Path = RENDERED_DIR) -> str:
    """The chat template training used: as recorded by the render stage, else the tokenizer's own if it has one."""
    used = [t for t in templates_used(rendered_dir) or [] if t in templates.CHAT_TEMPLATES]
    if used:
        return used[0]
    return "tokenizer" if templates.has_chat_template(tokenizer) else "chatml"
