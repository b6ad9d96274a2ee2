"""Render stage, preference pairs: every shape people keep them in (TRL's standard and conversational forms,
LLaMA-Factory's ShareGPT form, Anthropic HH transcripts), field mapping, templates, and the suspicious pairs counted."""

import pytest
from test_render import in_tmp, jsonl, run, write  # noqa: F401

from stages.lib.base.errors import UserError
from stages.lib.tokenizing.records import as_document

CHATML_ASK = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def prompt(record):
    assert not any(s["response"] for s in record["prompt"])
    return "".join(s["text"] for s in record["prompt"])


def plain(segments):
    return [{"text": s["text"], "response": s["response"]} for s in segments]


def answer(record, which):
    return "".join(s["text"] for s in record[which] if s["response"])


def test_trl_standard_strings_are_used_as_they_are_by_default():
    write("raw/p.jsonl", jsonl({"prompt": "2+2=", "chosen": "4", "rejected": "5"}))
    records, stats = run("raw/p.jsonl")
    assert records[0]["kind"] == "preference" and stats["formats"] == {"raw/p.jsonl": "preference"}
    assert prompt(records[0]) == "2+2="
    assert plain(records[0]["chosen"]) == [{"text": "4", "response": True}]
    assert plain(records[0]["rejected"]) == [{"text": "5", "response": True}]
    assert stats["suspicious"] == {} and stats["templates"] == []


def test_string_pairs_take_the_alpaca_or_a_chat_template_when_asked():
    write("raw/p.jsonl", jsonl({"prompt": "Add 2 and 2.", "chosen": "4", "rejected": "5"}))
    alpaca, _ = run("raw/p.jsonl", template="alpaca")
    assert prompt(alpaca[0]).endswith("### Instruction:\nAdd 2 and 2.\n\n### Response:\n")
    chatml, stats = run("raw/p.jsonl", template="chatml")
    assert prompt(chatml[0]) == CHATML_ASK.format("Add 2 and 2.")
    assert plain(chatml[0]["chosen"]) == [{"text": "4<|im_end|>", "response": True}, {"text": "\n", "response": False}]
    # The template's special tokens stay marked as control text on both sides of the cut.
    marked = [s["text"][a:b] for s in chatml[0]["prompt"] + chatml[0]["chosen"] for a, b in s.get("control", ())]
    assert marked == ["<|im_start|>", "<|im_end|>", "<|im_start|>", "<|im_end|>"]
    assert answer(chatml[0], "rejected") == "5<|im_end|>" and stats["templates"] == ["chatml"]


def test_trl_conversational_form_drops_the_prompt_the_answers_repeat():
    question = [{"role": "user", "content": "Capital of France?"}]
    record = {"prompt": "Capital of France?", "chosen": question + [{"role": "assistant", "content": "Paris"}],
              "rejected": question + [{"role": "assistant", "content": "Lyon"}], "score_chosen": 9.0}
    write("raw/u.jsonl", jsonl(record, {**record, "prompt": question}))
    records, stats = run("raw/u.jsonl")
    for r in records:
        assert prompt(r) == CHATML_ASK.format("Capital of France?")
        assert (answer(r, "chosen"), answer(r, "rejected")) == ("Paris<|im_end|>", "Lyon<|im_end|>")
    assert stats["suspicious"] == {} and stats["fields_dropped"]["score_chosen"]["count"] == 2


def test_llamafactory_sharegpt_pairs_keep_the_whole_conversation_as_prompt():
    record = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Name a colour"}],
              "chosen": {"from": "gpt", "value": "Blue"}, "rejected": {"from": "gpt", "value": "I cannot"}}
    write("raw/lf.json", "[" + jsonl(record).strip() + "]")
    records, _ = run("raw/lf.json")
    assert prompt(records[0]) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                    "<|im_start|>assistant\nHello<|im_end|>\n" + CHATML_ASK.format("Name a colour"))
    assert (answer(records[0], "chosen"), answer(records[0], "rejected")) == ("Blue<|im_end|>", "I cannot<|im_end|>")


def test_anthropic_hh_transcripts_split_at_the_last_assistant_turn_of_their_shared_part():
    shared = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant:"
    write("raw/hh.jsonl", jsonl({"chosen": shared + " Why did the chicken...", "rejected": shared + " No."}))
    records, stats = run("raw/hh.jsonl")
    assert prompt(records[0]) == shared
    assert (answer(records[0], "chosen"), answer(records[0], "rejected")) == (" Why did the chicken...", " No.")
    assert stats["suspicious"] == {}


def test_implicit_prompt_in_message_lists_is_their_shared_turns():
    ask = [{"role": "user", "content": "Hi"}]
    write("raw/m.jsonl", jsonl({"chosen": ask + [{"role": "assistant", "content": "Hello"}],
                                "rejected": ask + [{"role": "assistant", "content": "Go away"}]}))
    records, _ = run("raw/m.jsonl")
    assert prompt(records[0]) == CHATML_ASK.format("Hi")
    assert answer(records[0], "rejected") == "Go away<|im_end|>"


def test_field_names_are_mapped():
    write("raw/q.jsonl", jsonl({"question": "Q?", "good": "yes", "bad": "no"}))
    records, _ = run("raw/q.jsonl", format="preference", fields={"prompt": "question", "chosen": "good",
                                                                   "rejected": "bad"})
    assert (prompt(records[0]), answer(records[0], "chosen"), answer(records[0], "rejected")) == ("Q?", "yes", "no")


def test_dotted_field_names_reach_into_nested_objects():
    write("raw/q.jsonl", jsonl({"ask": {"text": "Q?"}, "answers": {"good": "yes", "bad": "no"}}))
    records, _ = run("raw/q.jsonl", format="preference", fields={"prompt": "ask.text", "chosen": "answers.good",
                                                                   "rejected": "answers.bad"})
    assert (prompt(records[0]), answer(records[0], "chosen"), answer(records[0], "rejected")) == ("Q?", "yes", "no")


def test_suspicious_pairs_are_counted_and_located():
    shared = "\n\nHuman: Hi\n\nAssistant:"
    write("raw/s.jsonl", jsonl({"prompt": "a", "chosen": "same", "rejected": "same"},
                               {"prompt": "b", "chosen": "fine", "rejected": " "},
                               {"chosen": shared + " Hello", "rejected": shared + " Yo\n\nHuman: ?\n\nAssistant: !"},
                               {"prompt": "c", "chosen": "ok", "rejected": "not ok"}))
    records, stats = run("raw/s.jsonl")
    assert len(records) == 4
    assert stats["suspicious"]["identical_answers"] == {"count": 1, "first": ["raw/s.jsonl:1"]}
    assert stats["suspicious"]["empty_answer"] == {"count": 1, "first": ["raw/s.jsonl:2"]}
    assert stats["suspicious"]["prompts_differ"] == {"count": 1, "first": ["raw/s.jsonl:3"]}
    skipped, stats = run("raw/s.jsonl", empty_answers="skip")
    assert len(skipped) == 3 and stats["records_skipped"] == 1


def test_answers_that_repeat_a_different_prompt_are_flagged():
    record = {"prompt": "Q1", "chosen": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A"}],
              "rejected": [{"role": "assistant", "content": "B"}]}
    write("raw/d.jsonl", jsonl(record))
    records, stats = run("raw/d.jsonl")
    assert prompt(records[0]) == CHATML_ASK.format("Q1") and answer(records[0], "chosen") == "A<|im_end|>"
    assert stats["suspicious"]["prompts_differ"]["count"] == 1


def test_pairs_that_share_no_prompt_stop_with_the_field_to_map():
    write("raw/x.jsonl", jsonl({"chosen": "yes", "rejected": "no"}))
    with pytest.raises(UserError, match=r"raw/x.jsonl:1: .*render.fields"):
        run("raw/x.jsonl")


def test_a_rendered_pair_reads_as_its_prompt_and_chosen_answer_for_sft_and_the_tokenizer():
    write("raw/p.jsonl", jsonl({"prompt": "2+2=", "chosen": "4", "rejected": "5"}))
    records, _ = run("raw/p.jsonl")
    doc = as_document(records[0])
    assert doc.text == "2+2=4" and doc.response_spans == [(4, 5)]
