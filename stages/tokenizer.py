"""Tokenizer stage: a local HuggingFace tokenizer folder, or a byte-level BPE trained on the rendered text.

Either way the result is saved with `save_pretrained` to data/tokenizer/, so the tokenize stage reads its
`tokenizer.json` and the exported model later carries the exact same tokenizer.
"""

import re
from pathlib import Path
from typing import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from stages.lib.base.errors import UserError, run_stage
from stages.lib.base.files import replaced_folder
from stages.lib.base.params import RENDERED_DIR, TOKENIZER_DIR, TokenizerParams, load_params
from stages.lib.tokenizing.loading import KEY, load_tokenizer_folder
from stages.lib.tokenizing.mixture import read_spans
from stages.lib.tokenizing.records import RECORDS_FILE, parse_record, templates_used

EOS_TOKEN = "<|endoftext|>"
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]
# The same text the render stage writes for the chatml template (stages/lib/ingest/chat_templates.py, tool calls
# included), so generation sees what training saw.
CHATML_TEMPLATE = (
    "{%- set ns = namespace(messages=messages) %}"
    "{%- if tools %}"
    "{%- set block = '# Tools\\n<tools>\\n' ~ (tools | map('tojson') | join('\\n')) ~ '\\n</tools>' %}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set ns.messages = messages[1:] %}"
    "{%- if messages[0]['content'] %}{%- set block = messages[0]['content'] ~ '\\n\\n' ~ block %}{%- endif %}"
    "{%- endif %}"
    "{{- '<|im_start|>system\\n' ~ block ~ '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in ns.messages %}"
    "{{- '<|im_start|>' ~ message['role'] ~ '\\n' ~ (message['content'] or '') }}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{{- '\\n' if message['content'] or not loop.first else '' }}"
    "{{- '<tool_call>\\n' ~ ({'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson)"
    " ~ '\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
BYTE_ALPHABET = 256  # a byte-level BPE starts from one token per byte

def main() -> None:
    """Entry point of `python -m stages.tokenizer`."""
    params = load_params()
    build_tokenizer(params.tokenizer, RENDERED_DIR, TOKENIZER_DIR)


def build_tokenizer(params: TokenizerParams, rendered_dir: Path, out_dir: Path) -> PreTrainedTokenizerBase:
    """Load or train the tokenizer the params ask for and save it as a HuggingFace folder in `out_dir`."""
    rendered_dir = Path(rendered_dir)
    if params.tokenizer_type == "huggingface":
        tokenizer = load_huggingface_tokenizer(Path(params.tokenizer_path), params.trust_remote_code)
    else:
        chat = "chatml" in templates_used(rendered_dir, required=True)
        spans = read_spans(rendered_dir)
        training = sum(s.records for s in spans if not s.validation) if any(s.validation for s in spans) else None
        tokenizer = train_bpe(rendered_dir / RECORDS_FILE, params.vocab_size, params.min_frequency, chat, training)
    with replaced_folder(out_dir) as folder:
        tokenizer.save_pretrained(str(folder))
        if not (folder / "tokenizer.json").exists():
            raise UserError(f"the tokenizer from {params.tokenizer_path} saved no tokenizer.json; the tokenize stage "
                            "needs the fast `tokenizers` backend: use a tokenizer that has one, or tokenizer_type: bpe")
    template = "with a chat template" if tokenizer.chat_template else "no chat template"
    print(f"tokenizer: {len(tokenizer):,} tokens, EOS {tokenizer.eos_token!r} = id {tokenizer.eos_token_id}, "
          f"{template} -> {out_dir}")
    return tokenizer


def load_huggingface_tokenizer(path: Path, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local folder, refusing what the tokenize stage cannot use."""
    tokenizer = load_tokenizer_folder(path, trust_remote_code)
    if not tokenizer.is_fast:
        raise UserError(f"{KEY} = '{path}' is a slow (Python) {type(tokenizer).__name__} without tokenizer.json; "
                        "the tokenize stage needs the fast `tokenizers` backend: add a tokenizer.json to the "
                        "folder, or use tokenizer_type: bpe")
    if tokenizer.eos_token is None:
        raise UserError(f"{KEY} = '{path}': the tokenizer has no EOS token, which ends every document; add "
                        "\"eos_token\" to its tokenizer_config.json")
    return tokenizer


def train_bpe(records_path: Path, vocab_size: int, min_frequency: int, chat: bool,
              limit: int | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the records' text, streamed; ChatML tokens and template when `chat`.

    `limit`: train on the first that many records only (the training sources, before the validation source).
    """
    special = [EOS_TOKEN] + (CHATML_TOKENS if chat else [])
    if vocab_size < BYTE_ALPHABET + len(special):
        raise UserError(f"tokenizer.vocab_size = {vocab_size} is too small: a byte-level BPE needs "
                        f"{BYTE_ALPHABET} byte tokens + {len(special)} special token(s) = "
                        f"{BYTE_ALPHABET + len(special)} at least; raise it (a few thousand is typical)")
    if not records_path.exists():
        raise UserError(f"{records_path} not found: run the render stage first (dvc repro render)")
    tokenizer = Tokenizer(models.BPE())
    # Digits one by one: numbers then share tokens, which helps arithmetic (the sample data is arithmetic).
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    documents = [0]
    tokenizer.train_from_iterator(_training_texts(records_path, special, documents, limit), trainer)
    if documents[0] == 0:
        raise UserError(f"{records_path} holds no records to train a tokenizer on; check render.data_path")
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    if chat:
        fast.chat_template = CHATML_TEMPLATE
    return fast


def _training_texts(records_path: Path, special: list[str], documents: list[int],
                    limit: int | None) -> Iterator[list[str]]:
    """Batches of document text with special tokens cut out (encoding splits them off the same way)."""
    cut = re.compile("|".join(re.escape(token) for token in special))
    batch = []
    with open(records_path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if documents[0] == limit:
                break
            try:
                text = parse_record(line).text
            except ValueError as err:
                raise UserError(f"{records_path}, line {number}: {err}; rerun the render stage") from None
            documents[0] += 1
            batch.extend(piece for piece in cut.split(text) if piece)
            if len(batch) >= 1000:
                yield batch
                batch = []
    if batch:
        yield batch


if __name__ == "__main__":
    run_stage(main)
