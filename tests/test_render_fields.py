"""Render stage: field and role mappings, content parts, tool calls, and every suspicious record counted."""

import json

import pytest
from conftest import unmarked
from test_render import (  # noqa: F401
    ALPACA_NO_INPUT,
    CHAT,
    CHATML_SEGMENTS,
    hf,
    in_tmp,
    jsonl,
    make_hf_tokenizer,
    response_texts,
    run,
    texts,
    write,
)

from stages.lib.base.errors import UserError

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                 "parameters": {"type": "object",
                                                                "properties": {"city": {"type": "string"}}}}}


# ---- field and role mapping -------------------------------------------------------------------------------------

def test_fields_map_a_files_names_to_ours_and_unmapped_records_read_as_today():
    write("raw/qa.jsonl", jsonl({"question": "Say hi.", "answer": "hi", "id": 3},
                                {"instruction": "Say hi.", "output": "hello"}))
    records, stats = run("raw/qa.jsonl", fields={"instruction": "question", "output": "answer"})
    assert [r["segments"] for r in records] == [[{"text": ALPACA_NO_INPUT, "response": False},
                                                 {"text": "hi", "response": True}],
                                                [{"text": ALPACA_NO_INPUT, "response": False},
                                                 {"text": "hello", "response": True}]]
    assert stats["fields_dropped"] == {"id": {"count": 1, "first": ["raw/qa.jsonl:1"]}}


def test_a_dialog_field_with_speaker_and_text_keys_and_custom_roles():
    dialog = [{"speaker": "Narrator", "text": "Be brief."}, {"speaker": "Human", "text": "2+3?"},
              {"speaker": "BOT", "text": "5"}, {"speaker": "human", "text": "times 2?"},
              {"speaker": "Model", "text": "10"}]
    write("raw/d.jsonl", jsonl({"dialog": dialog}))
    with pytest.raises(UserError, match=r"raw/d\.jsonl:1: a record that is neither.*'dialog'.*render\.fields"):
        run("raw/d.jsonl")
    records, _ = run("raw/d.jsonl", fields={"messages": "dialog", "role": "speaker", "content": "text"},
                     roles={"narrator": "system"})
    assert unmarked(records[0]["segments"]) == CHATML_SEGMENTS


def test_known_role_names_map_without_settings():
    names = {"system": "developer", "user": "prompter", "assistant": "chatgpt"}
    write("raw/c.jsonl", jsonl({"messages": [{"role": names[m["role"]], "content": m["content"]} for m in CHAT]}))
    records, _ = run("raw/c.jsonl")
    assert unmarked(records[0]["segments"]) == CHATML_SEGMENTS


def test_a_jsonl_of_text_records_is_plain_text():
    write("raw/t.jsonl", jsonl({"text": "first document", "meta": {"lang": "en"}}, {"text": "second\r\nline"}))
    records, stats = run("raw/t.jsonl")
    assert texts(records) == ["first document", "second\nline"] and stats["formats"] == {"raw/t.jsonl": "text"}
    assert stats["fields_dropped"]["meta"]["count"] == 1
    records, _ = run("raw/t.jsonl", fields={"text": "body"})  # a name that is absent falls back to ours
    assert len(records) == 2


# ---- content parts ----------------------------------------------------------------------------------------------

def test_content_parts_keep_their_text_and_other_parts_are_named():
    parts = [{"role": "user", "content": [{"type": "text", "text": "2+"}, {"type": "text", "text": "3?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "5"}]}]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}},
                                          {"type": "text", "text": "What is it?"}]},
             {"role": "assistant", "content": "A cat."}]
    write("raw/c.jsonl", jsonl({"messages": parts}, {"messages": image}))
    with pytest.raises(UserError, match=r"raw/c\.jsonl:2: messages\[0\]\.content\[0\] is a content part of type "
                                        r"'image_url'; only text parts"):
        run("raw/c.jsonl")
    records, stats = run("raw/c.jsonl", on_error="skip")
    assert records[0]["segments"][0]["text"] == "<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n"
    assert stats["records_skipped"] == 1 and stats["skipped"][0]["line"] == 2


# ---- tool calls -------------------------------------------------------------------------------------------------

SHAREGPT_TOOLS = {
    "conversations": [{"from": "human", "value": "Weather in Paris?"},
                      {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
                      {"from": "observation", "value": '{"temp": 20}'},
                      {"from": "gpt", "value": "It is 20 degrees."}],
    "tools": json.dumps([WEATHER_TOOL]),
}
OPENAI_TOOLS = {
    "messages": [{"role": "user", "content": "Weather in Paris?"},
                 {"role": "assistant", "content": None, "tool_calls": [
                     {"id": "c1", "type": "function",
                      "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                 {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 20}'},
                 {"role": "assistant", "content": "It is 20 degrees."}],
    "tools": [WEATHER_TOOL],
}
TOOLS_CHATML = [
    {"text": "<|im_start|>system\n# Tools\n<tools>\n" + json.dumps(WEATHER_TOOL) + "\n</tools><|im_end|>\n"
             "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n", "response": False},
    {"text": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
     "response": True},
    {"text": '\n<|im_start|>tool\n{"temp": 20}<|im_end|>\n<|im_start|>assistant\n', "response": False},
    {"text": "It is 20 degrees.<|im_end|>", "response": True},
    {"text": "\n", "response": False}]


@pytest.mark.parametrize("record", [SHAREGPT_TOOLS, OPENAI_TOOLS], ids=["sharegpt", "openai"])
def test_tool_calls_and_results_render_in_chatml_with_the_tools(record):
    write("raw/t.jsonl", jsonl(record))
    records, stats = run("raw/t.jsonl")
    assert unmarked(records[0]["segments"]) == TOOLS_CHATML
    assert stats["fields_dropped"] == {}  # tools included; call ids stay on the messages


def test_the_exported_chatml_template_renders_tool_conversations_as_training_did():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from stages.lib.base.params import FieldNames
    from stages.lib.ingest.chat_templates import render_chat
    from stages.lib.ingest.fields import Mapping, read_chat
    from stages.tokenizer import CHATML_TEMPLATE

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), eos_token="<|endoftext|>",
                                        chat_template=CHATML_TEMPLATE)
    read = read_chat(OPENAI_TOOLS, Mapping.build(FieldNames()))
    for messages in (read.value, [{"role": "system", "content": "Be brief."}, *read.value]):
        rendered = "".join(s["text"] for s in render_chat(messages, "chatml", tools=read.tools))
        assert tokenizer.apply_chat_template(messages, tools=read.tools, tokenize=False) == rendered


TOOL_TEMPLATE = (
    "{% if tools %}{{ 'TOOLS:' + (tools | map(attribute='function') | map(attribute='name') | join(',')) + '\n' }}"
    "{% endif %}{% for m in messages %}{{ '<' + m['role'] + '>' }}{% if m.get('tool_calls') %}"
    "{% for c in m['tool_calls'] %}{{ 'CALL ' + c['function']['name'] }}{% endfor %}"
    "{% else %}{{ m['content'] }}{% endif %}{{ '</s>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}")
PLAIN_TEMPLATE = ("{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + '\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}")


def test_tools_go_to_a_tokenizer_template_that_takes_them_and_are_counted_when_it_does_not():
    write("raw/t.jsonl", jsonl(OPENAI_TOOLS))
    make_hf_tokenizer("tool_tok", TOOL_TEMPLATE)
    records, stats = run("raw/t.jsonl", tokenizer=hf("tool_tok"))
    assert texts(records)[0].startswith("TOOLS:get_weather\n<user>Weather in Paris?</s>\n<assistant>")
    assert response_texts(records[0]) == ["CALL get_weather</s>\n", "It is 20 degrees.</s>\n"]
    make_hf_tokenizer("plain_tok", PLAIN_TEMPLATE)
    write("raw/t.jsonl", jsonl({**SHAREGPT_TOOLS, "conversations": SHAREGPT_TOOLS["conversations"][:1] + [
        {"from": "gpt", "value": "Sunny."}]}, OPENAI_TOOLS))
    with pytest.raises(UserError, match=r"raw/t\.jsonl:2: the conversation has tool calls, which the tokenizer's "
                                        r"chat template does not render.*chatml"):
        run("raw/t.jsonl", tokenizer=hf("plain_tok"))
    records, stats = run("raw/t.jsonl", tokenizer=hf("plain_tok"), on_error="skip")
    assert len(records) == 1 and stats["records_skipped"] == 1
    assert stats["fields_dropped"]["tools"] == {"count": 1, "first": ["raw/t.jsonl:1"]}


def test_bad_tool_calls_are_bad_records():
    call = {"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "not json"}]}
    write("raw/t.jsonl", jsonl(call, {**SHAREGPT_TOOLS, "tools": "[not json"}, SHAREGPT_TOOLS))
    records, stats = run("raw/t.jsonl", on_error="skip")
    assert [r["source"] for r in records] == ["raw/t.jsonl:3"]
    problems = [s["problem"] for s in stats["skipped"]]
    assert "should hold a tool call as JSON" in problems[0] and "field 'tools' is text that is not JSON" in problems[1]


# ---- suspicious records -----------------------------------------------------------------------------------------

def test_suspicious_records_are_counted_with_their_first_locations():
    records = [{"instruction": "Say nothing.", "output": "  "},
               {"messages": [{"role": "system", "content": "x"}, {"role": "assistant", "content": "hi"}]},
               {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""},
                             {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]},
               {"messages": [{"role": "user", "content": "only a question"}]},
               {"instruction": "Long.", "output": "x" * 300, "source": "web", "lang": None},
               {"instruction": "Fine.", "output": "fine"}]
    write("raw/a.jsonl", jsonl(*[r for r in records if "instruction" in r]))
    write("raw/b.jsonl", jsonl(*[r for r in records if "messages" in r]))
    kept, stats = run("raw", long_record_chars=250)
    assert len(kept) == 6
    assert stats["suspicious"] == {
        "empty_answer": {"count": 3, "first": ["raw/a.jsonl:1", "raw/b.jsonl:2", "raw/b.jsonl:3"]},
        "no_user_turn": {"count": 1, "first": ["raw/b.jsonl:1"]},
        "long_record": {"count": 1, "first": ["raw/a.jsonl:2"]},
        "ends_on_user_turn": {"count": 1, "first": ["raw/b.jsonl:3"]}}
    assert stats["fields_dropped"] == {"source": {"count": 1, "first": ["raw/a.jsonl:2"]}}  # null lang: nothing lost
    skipped, stats = run("raw", empty_answers="skip")
    assert len(skipped) == 3 and stats["records_skipped"] == 3
    assert stats["skipped"][0] == {"file": "raw/a.jsonl", "line": 1,
                                   "problem": "empty answer (render.empty_answers: skip)"}
    assert "long_record" not in stats["suspicious"]  # 50,000 characters by default


def test_the_summary_names_the_suspicious_records(capsys):
    write("raw/a.jsonl", jsonl({"instruction": "Say nothing.", "output": ""}, {"instruction": "a", "output": "b",
                                                                              "status": "ok"}))
    run("raw/a.jsonl")
    err = capsys.readouterr().err
    assert "1 empty answers" in err and "raw/a.jsonl:1" in err
    assert "fields nothing reads, dropped: status (1x, first raw/a.jsonl:2)" in err
