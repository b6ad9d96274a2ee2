"""params.yaml loading: strict keys, types and ranges, with messages that say what to fix."""

from pathlib import Path

import pytest
import yaml

from stages.lib.base.params import ParamError, Params, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


def write_params(tmp_path, data) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_committed_params_yaml_loads_and_sets_every_field():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    for section in ("render", "tokenizer", "tokenize", "train"):
        declared = set(vars(getattr(params, section)))
        assert declared == set(raw[section]), f"params.yaml section '{section}' should list every key"


def test_typo_names_the_key_and_suggests_the_right_one(tmp_path):
    path = write_params(tmp_path, {"train": {"batch_sise": 8}})
    with pytest.raises(ParamError, match=r"unknown key 'train\.batch_sise'.*did you mean 'train\.batch_size'"):
        load_params(path)


def test_typo_in_nested_section_and_in_section_name():
    with pytest.raises(ParamError, match=r"train\.model\.n_layers.*train\.model\.n_layer"):
        parse_params({"train": {"model": {"n_layers": 2}}})
    with pytest.raises(ParamError, match=r"unknown key 'tokenise'.*'tokenize'"):
        parse_params({"tokenise": {}})


@pytest.mark.parametrize("section, key, value, allowed", [
    ("tokenize", "val_ratio", 1.0, r"in \[0, 1\)"),
    ("tokenize", "val_ratio", -0.1, r"in \[0, 1\)"),
    ("train", "batch_size", 0, ">= 1"),
    ("train", "batch_size", 2.5, "a whole number"),
    ("train", "batch_size", True, "a whole number"),
    ("tokenize", "shuffle", "yes", "true or false"),
    ("render", "format", "csv", "one of 'auto', 'text'"),
    ("train", "lr", "fast", "a number"),
    ("train", "resume", "maybe", "one of 'auto', 'require', 'never'"),
    ("train", "schedule", "linear", "one of 'cosine', 'wsd'"),
    ("train", "decay_fraction", 0.0, r"in \(0, 1\]"),
    ("train", "minutes_today", "soon", "0 \\(no limit\\), a number of minutes > 0, or 'auto'"),
    ("train", "minutes_today", -5, "0 \\(no limit\\), a number of minutes > 0, or 'auto'"),
])
def test_wrong_type_or_range_names_key_value_and_what_is_allowed(section, key, value, allowed):
    with pytest.raises(ParamError, match=rf"{section}\.{key} = .* is not allowed; expected {allowed}"):
        parse_params({section: {key: value}})


def test_float_written_without_a_dot_is_accepted():
    # YAML 1.1 reads 3e-4 as a string; people write learning rates that way.
    params = parse_params(yaml.safe_load("train: {lr: 3e-4, min_lr: 1e-5}"))
    assert params.train.lr == pytest.approx(3e-4)


def test_minutes_today_is_a_number_or_auto():
    assert parse_params({"train": {"minutes_today": "auto"}}).train.minutes_today == "auto"
    assert parse_params({"train": {"minutes_today": 90}}).train.minutes_today == 90


def test_missing_keys_take_defaults():
    assert parse_params({}) == Params()


def test_rules_across_keys(tmp_path):
    with pytest.raises(ParamError, match="tokenizer_path is empty"):
        load_params(write_params(tmp_path, {"tokenizer": {"tokenizer_type": "huggingface"}}))
    with pytest.raises(ParamError, match="seq_len = 1024 is above train.model.max_position_embeddings = 512"):
        load_params(write_params(tmp_path, {"train": {"seq_len": 1024, "model": {"max_position_embeddings": 512}}}))
    with pytest.raises(ParamError, match="min_lr"):
        load_params(write_params(tmp_path, {"train": {"lr": 1e-4, "min_lr": 1e-3}}))


def test_missing_file_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(ParamError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamError, match="not valid YAML"):
        load_params(bad)


def test_render_mixture_fields_and_roles():
    params = parse_params({"render": {"data_path": "data/raw", "validation_path": "data/raw/val.jsonl",
                                      "sources": [{"path": "data/raw/a.parquet", "weight": 2.5},
                                                  {"path": "data/raw/b", "fields": {"output": "answer"}}],
                                      "fields": {"messages": "dialog"}, "roles": {"Narrator": "system"}}})
    render = params.render
    assert [(s.path, s.weight) for s in render.sources] == [("data/raw/a.parquet", 2.5), ("data/raw/b", 1.0)]
    assert render.sources[1].fields.output == "answer" and render.fields.messages == "dialog"
    assert render.roles == {"Narrator": "system"}


@pytest.mark.parametrize("render, message", [
    ({"sources": [{"path": "a", "wieght": 2}]},
     r"unknown key 'render\.sources\[0\]\.wieght'.*'render\.sources\[0\]\.weight'"),
    ({"sources": [{"path": "a", "weight": 0}]}, r"render\.sources\[0\]\.weight = 0\.0 is not allowed; expected > 0"),
    ({"sources": "data/raw"}, r"render\.sources = 'data/raw' is not allowed; expected a list"),
    ({"roles": {"bot": "robot"}}, r"render\.roles\.bot = 'robot' is not allowed; expected one of 'system'"),
    ({"roles": ["bot"]}, r"render\.roles = \['bot'\] is not allowed; expected a mapping"),
    ({"fields": {"answer": "output"}}, r"unknown key 'render\.fields\.answer'; valid keys: text, instruction"),
    ({"workers": 0}, r"render\.workers = 0 is not allowed; expected 'auto' or a whole number >= 1"),
])
def test_render_mixture_mistakes_name_the_key(render, message):
    with pytest.raises(ParamError, match=message):
        parse_params({"render": render})


def test_a_source_needs_a_path(tmp_path):
    with pytest.raises(ParamError, match=r"render\.sources\[0\] has no path"):
        load_params(write_params(tmp_path, {"render": {"sources": [{"weight": 2}]}}))
