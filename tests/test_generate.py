"""The generate command: prompts built with the training templates, batched and streamed decoding, stopping."""

import io
import json

import pytest
import torch
from conftest import save_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from stages import generate as generate_command
from stages.generate import Conversation
from stages.lib.base.errors import UserError
from stages.lib.ingest import chat_templates as templates
from stages.lib.modeling import inference
from stages.lib.modeling.inference import Decoding, choose_chat_template, choose_style, generate_ids, load_model

CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["Add 3 and 4.", "What is 12 minus 5?", "Reverse the word lomak.", "Upper-case the word tib.",
          "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
          "### Instruction:\n### Input:\n### Response:\n", "The quick brown fox jumps over the lazy dog. 0123456789"]


def save_tiny_export(folder, chat_template: str | None = None, max_positions: int = 256, seed: int = 0):
    """Write a tiny Llama and a tiny byte-level BPE tokenizer into `folder`, as the train stage's export does.

    The output rows of the stop tokens are zero, so their logit is 0 while the best other token's is almost surely
    positive: greedy decoding never stops early, which lets tests count the tokens generated.
    """
    specials = ("<|endoftext|>", templates.CHATML_START, templates.CHATML_END)
    tokenizer = save_tokenizer(folder, corpus=CORPUS, specials=specials, eos="<|endoftext|>", pad="<|endoftext|>",
                               chat_template=chat_template)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_positions,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for token in specials:
            model.lm_head.weight[tokenizer.convert_tokens_to_ids(token)] = 0
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return save_tiny_export(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def loaded(export):
    return load_model(export, device="cpu")


def test_reply_is_text_and_has_exactly_max_new_tokens_when_nothing_stops_it(loaded):
    model, tokenizer = loaded
    prompt = inference.instruction_prompt("Add 3 and 4.")
    for limit in (1, 6):
        ids = generate_ids(model, tokenizer, [prompt], Decoding(max_new_tokens=limit))[0]
        assert len(ids) == limit
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert isinstance(text, str) and text


def test_greedy_is_deterministic_and_batching_does_not_change_answers(loaded):
    model, tokenizer = loaded
    prompts = [inference.instruction_prompt(q) for q in ("Add 3 and 4.", "Reverse the word lomak.")]
    prompts.append("The quick brown fox")
    decoding = Decoding(max_new_tokens=8)
    alone = [generate_ids(model, tokenizer, [p], decoding)[0] for p in prompts]
    assert [generate_ids(model, tokenizer, [p], decoding)[0] for p in prompts] == alone
    # Left padding must leave each prompt's answer as it is when generated on its own.
    assert generate_ids(model, tokenizer, prompts, decoding) == alone


def test_seeded_sampling_repeats_and_other_seeds_differ(loaded):
    model, tokenizer = loaded
    decoding = Decoding(max_new_tokens=12, temperature=1.5, top_k=0, top_p=1.0)

    def answer(seed):
        return Conversation(model, tokenizer, "text", "", decoding, seed).reply("The quick", stream=False)

    assert answer(1) == answer(1)
    assert len({answer(seed) for seed in range(1, 5)}) > 1


def test_generation_stops_at_eos(tmp_path):
    model, tokenizer = load_model(save_tiny_export(tmp_path), device="cpu")
    with torch.no_grad():  # every logit 0: greedy takes id 0, the EOS, at once
        model.model.norm.weight.zero_()
    assert tokenizer.eos_token_id == 0
    assert generate_ids(model, tokenizer, ["Add 3 and 4."], Decoding(max_new_tokens=5)) == [[]]


def test_stop_tokens_are_eos_and_im_end(loaded):
    model, tokenizer = loaded
    stops = templates.stop_token_ids(tokenizer, model)
    assert stops == sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(templates.CHATML_END)})


def test_instruction_prompt_is_the_training_prompt(loaded):
    model, tokenizer = loaded
    session = Conversation(model, tokenizer, "instruction", "", Decoding(max_new_tokens=2))
    trained = templates.render_instruction("Add 3 and 4.", "", "7")
    assert [s["response"] for s in trained] == [False, True]
    assert session.prompt_for("Add 3 and 4.") == trained[0]["text"]
    assert inference.instruction_prompt("Add", "3 and 4") == templates.render_instruction("Add", "3 and 4", "")[0][
        "text"]


@pytest.mark.parametrize("render_template", ["chatml", "tokenizer"])
def test_instruction_prompt_follows_a_chat_render_template(tmp_path, render_template):
    _, tokenizer = load_model(save_tiny_export(tmp_path, chat_template=CHATML_TEMPLATE), device="cpu")
    template = inference.instruction_template(render_template)
    assert template == render_template and inference.instruction_template("auto") == "alpaca"
    # The render stage renders instruction data with a chat template as a user turn and an assistant answer.
    trained = templates.render_chat(templates.instruction_as_chat("Reverse the word", "lomak", "kamol"), template,
                                    tokenizer)
    assert inference.instruction_prompt("Reverse the word", "lomak", template, tokenizer) == trained[0]["text"]


@pytest.mark.parametrize("template", ["chatml", "tokenizer"])
def test_chat_keeps_the_conversation_in_the_training_template(tmp_path, template):
    model, tokenizer = load_model(save_tiny_export(tmp_path, chat_template=CHATML_TEMPLATE), device="cpu")
    session = Conversation(model, tokenizer, "chat", template, Decoding(max_new_tokens=4))
    first = session.reply("Add 3 and 4.", stream=False)
    prompt = session.prompt_for("And 5 and 6?")
    assert len(session.messages) == 2 and session.messages[1] == {"role": "assistant", "content": first}
    # What training saw for this conversation: everything before the last answer is the prompt.
    conversation = session.messages + [{"role": "user", "content": "And 5 and 6?"},
                                       {"role": "assistant", "content": "11"}]
    segments = templates.render_chat(conversation, template, tokenizer)
    last_answer = max(i for i, s in enumerate(segments) if s["response"])
    assert prompt == "".join(s["text"] for s in segments[:last_answer])


def test_chat_drops_the_oldest_exchanges_to_fit_the_context(tmp_path):
    model, tokenizer = load_model(save_tiny_export(tmp_path, max_positions=64), device="cpu")
    session = Conversation(model, tokenizer, "chat", "chatml", Decoding(max_new_tokens=8))
    for question in ("Add 3 and 4.", "What is 12 minus 5?", "Reverse the word lomak."):
        session.reply(question, stream=False)
    prompt = session.prompt_for("Upper-case the word tib.")
    assert len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + 8 <= 64
    assert prompt.endswith("<|im_start|>user\nUpper-case the word tib.<|im_end|>\n<|im_start|>assistant\n")
    assert "Add 3 and 4." not in prompt


def test_style_follows_the_templates_the_training_data_used(loaded, tmp_path):
    _, tokenizer = loaded  # no chat template

    def style(templates_used, chat=None, raw=False):
        stats = tmp_path / "stats.json"
        stats.unlink(missing_ok=True)
        if templates_used is not None:
            stats.write_text(json.dumps({"templates": templates_used}))
        return choose_style(tokenizer, chat, raw, rendered_dir=tmp_path)

    assert style(["alpaca"]) == "instruction"
    assert style(["alpaca", "chatml"]) == "chat"
    assert style([]) == "text"
    assert style(None) == "instruction"
    assert style(["chatml"], chat=False) == "instruction"
    assert style(["alpaca"], chat=True) == "chat"
    assert style(["alpaca"], raw=True) == "text"
    (tmp_path / "stats.json").write_text(json.dumps({"templates": ["alpaca", "tokenizer"]}))
    assert choose_chat_template(tokenizer, rendered_dir=tmp_path) == "tokenizer"
    (tmp_path / "stats.json").unlink()
    assert choose_chat_template(tokenizer, rendered_dir=tmp_path) == "chatml"


def test_command_streams_the_greedy_answer(export, loaded, capsys):
    model, tokenizer = loaded
    expected = inference.generate_texts(model, tokenizer, [inference.instruction_prompt("Add 3 and 4.")],
                                       Decoding(max_new_tokens=5))[0]
    generate_command.main(["--model", str(export), "--prompt", "Add 3 and 4.", "--no-chat", "--temperature", "0",
                   "--max-new-tokens", "5", "--device", "cpu"])
    assert capsys.readouterr().out == expected + "\n"


def test_interactive_mode_answers_each_line_and_reset_forgets(export, monkeypatch, capsys):
    prompts = []
    prompt_for = Conversation.prompt_for

    def recorded(self, message):
        prompts.append(prompt_for(self, message))
        return prompts[-1]

    monkeypatch.setattr(Conversation, "prompt_for", recorded)
    monkeypatch.setattr("sys.stdin", io.StringIO("Add 3 and 4.\nAnd 5?\n\n/reset\nReverse the word lomak.\n"))
    generate_command.main(["--model", str(export), "--chat", "--temperature", "0", "--max-new-tokens", "3",
                   "--device", "cpu"])
    assert len(prompts) == 3
    assert "Add 3 and 4." in prompts[1]  # the conversation is kept ...
    assert "Add 3 and 4." not in prompts[2]  # ... until /reset
    assert capsys.readouterr().out.count("\n") >= 3


def test_missing_model_folder_says_to_train_first(tmp_path):
    with pytest.raises(UserError, match="run the train stage first"):
        load_model(tmp_path / "models" / "nothing")
