"""The evaluate stage: masked validation loss over windows, exact match on held-out prompts, the written files."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import write_token_files
from test_generate import save_tiny_export

from stages import evaluate
from stages.lib.base.errors import UserError
from stages.lib.modeling.inference import Decoding, generate_texts, instruction_prompt, instruction_template, load_model
from stages.lib.tokenizing.batches import PackedDocuments, StreamWindows

SEQ_LEN = 8


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(save_tiny_export(tmp_path_factory.mktemp("model")), device="cpu")


def reference_loss(model, ids, mask, seq_len):
    """Loss the plain way: one window at a time, no padding, no batching; (mean loss, tokens counted)."""
    total, counted = reference_sum(model, ids, mask, seq_len)
    return total / counted, counted


def reference_sum(model, ids, mask, seq_len):
    """(summed loss, tokens counted) of consecutive windows of the stream, one at a time."""
    total, counted = 0.0, 0
    for start in range(0, len(ids) - 1, seq_len):
        window = torch.tensor(ids[start:start + seq_len + 1], dtype=torch.long)
        with torch.no_grad():
            logits = model(input_ids=window[None, :-1]).logits[0]
        losses = F.cross_entropy(logits, window[1:], reduction="none")
        weights = torch.tensor(mask[start + 1:start + seq_len + 1], dtype=torch.float64)
        total += float((losses.double() * weights).sum())
        counted += int(weights.sum())
    return total, counted


def windows(ids, mask):
    return StreamWindows(ids, mask, np.array([0]), SEQ_LEN)


def test_loss_counts_only_masked_tokens_and_matches_a_plain_loop(loaded):
    model, tokenizer = loaded
    rng = np.random.default_rng(0)
    n = 3 * SEQ_LEN + 5  # three full windows and a short one at the end
    ids = rng.integers(0, len(tokenizer), n).astype(np.uint16)
    mask = (rng.random(n) < 0.5).astype(np.uint8)
    mask[-3:] = 1  # the short last window counts
    mask[SEQ_LEN + 1:2 * SEQ_LEN + 1] = 0  # the second window has nothing to score: skipped
    expected, counted = reference_loss(model, ids, mask, SEQ_LEN)
    assert counted == int(mask[1:].sum())
    for batch_size in (1, 3, 16):
        result = evaluate.validation_loss(model, windows(ids, mask), batch_size)
        assert result["val_loss"] == pytest.approx(expected, abs=2e-6)
        assert result["perplexity"] == pytest.approx(np.exp(expected), rel=1e-5)
        assert result["val_loss_tokens"] == counted and result["val_tokens"] == n
    changed = mask.copy()
    changed[5] = 1 - changed[5]
    assert evaluate.validation_loss(model, windows(ids, changed), 4)["val_loss"] != pytest.approx(expected, abs=1e-6)
    empty = evaluate.validation_loss(model, windows(ids, np.zeros_like(mask)), 4)
    assert empty == {"val_loss": None, "perplexity": None, "val_tokens": n, "val_loss_tokens": 0}


def test_documents_loss_is_each_document_scored_alone(loaded):
    model, tokenizer = loaded
    rng = np.random.default_rng(1)
    lengths = [5, 3, 2 * SEQ_LEN + 3, 1, 7]  # one longer than seq_len, cut into pieces; a lone EOS predicts nothing
    docs = [rng.integers(0, len(tokenizer), n).astype(np.uint16) for n in lengths]
    masks = [(rng.random(n) < 0.7).astype(np.uint8) for n in lengths]
    ids, mask = np.concatenate(docs), np.concatenate(masks)
    starts = np.cumsum([0] + lengths[:-1])
    # Pieces of seq_len predictions, each read with no context before it, as training reads them.
    sums = [reference_sum(model, doc, doc_mask, SEQ_LEN) for doc, doc_mask in zip(docs, masks)]
    total, counted = sum(t for t, _ in sums), sum(n for _, n in sums)
    packed = PackedDocuments(ids, mask, starts, SEQ_LEN)
    assert packed.count < sum(-(-(n - 1) // SEQ_LEN) for n in lengths)  # short documents share samples
    result = evaluate.validation_loss(model, packed, batch_size=2)
    assert result["val_loss_tokens"] == counted
    assert result["val_loss"] == pytest.approx(total / counted, abs=2e-6)


def test_heldout_file_errors_name_file_and_line(tmp_path):
    path = tmp_path / "heldout.jsonl"
    path.write_text('{"instruction": "Add 1 and 2.", "output": "3"}\n\n{"instruction": "Add", "output": 3}\n')
    with pytest.raises(UserError, match=r"heldout.jsonl:3: 'output' must be a string"):
        evaluate.read_heldout(str(path))
    assert evaluate.read_heldout(str(path), limit=1) == [{"instruction": "Add 1 and 2.", "input": "", "output": "3"}]
    path.write_text('{"instruction": "Add 1 and 2.", "output": "3"\n')
    with pytest.raises(UserError, match=r"heldout.jsonl:1: not valid JSON"):
        evaluate.read_heldout(str(path))
    with pytest.raises(UserError, match="evaluate.prompts_path"):
        evaluate.read_heldout(str(tmp_path / "missing.jsonl"))
    assert evaluate.read_heldout("") == []


def make_project(root, loaded, n_val=40, seed=1, render_template="auto"):
    """A repository folder with params.yaml, the exported model, validation tokens and held-out prompts.

    Held-out prompt 1 expects what the model answers (padded with spaces, which scoring strips), prompt 2 expects
    something else, so exact match is known to be 1/2 whatever the random model says.
    """
    model, tokenizer = loaded
    save_tiny_export(root / "models" / "tiny")
    params = {"render": {"template": render_template},
              "train": {"model_name": "tiny", "seq_len": SEQ_LEN, "device": "cpu"},
              "evaluate": {"max_new_tokens": 4, "batch_size": 2}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    write_val_tokens(root / "data" / "tokens", np.random.default_rng(seed).integers(0, len(tokenizer), n_val),
                     len(tokenizer))
    questions = [("Add 3 and 4.", ""), ("Reverse the word", "lomak")]
    prompt = instruction_prompt(*questions[0], instruction_template(render_template), tokenizer)
    own = generate_texts(model, tokenizer, [prompt], Decoding(max_new_tokens=4))[0]
    heldout = [{"instruction": questions[0][0], "output": f"  {own} \n"},
               {"instruction": questions[1][0], "input": questions[1][1], "output": own + "x"}]
    (root / "data" / "eval").mkdir(parents=True)
    (root / "data" / "eval" / "heldout.jsonl").write_text("".join(json.dumps(h) + "\n" for h in heldout))
    return own


def write_val_tokens(folder, ids, vocab_size):
    """Token files with `ids` as one validation document, every other token in the loss."""
    ids = np.asarray(ids)
    every_other = (np.arange(len(ids)) % 2).astype(np.uint8)
    write_token_files(folder, {"train": [(ids[:4], every_other[:4])], "val": [(ids, every_other)]}, vocab_size,
                      eos_id=0)


@pytest.mark.parametrize("render_template", ["auto", "chatml"])
def test_stage_writes_metrics_and_samples_deterministically(tmp_path, loaded, monkeypatch, render_template):
    own = make_project(tmp_path, loaded, render_template=render_template)
    monkeypatch.chdir(tmp_path)
    evaluate.main()
    out = tmp_path / "outputs" / "eval"
    metrics = json.loads((out / "metrics.json").read_text())["eval"]
    assert set(metrics) == {"val_loss", "perplexity", "val_tokens", "val_loss_tokens", "exact_match", "n_prompts"}
    assert metrics["exact_match"] == 0.5 and metrics["n_prompts"] == 2
    assert metrics["val_tokens"] == 40 and metrics["val_loss_tokens"] == 20
    assert 0 < metrics["val_loss"] and metrics["perplexity"] == pytest.approx(np.exp(metrics["val_loss"]), rel=1e-5)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["correct"] for s in samples] == [True, False]
    assert samples[0] == {"prompt": "Add 3 and 4.", "expected": f"  {own} \n", "generated": own, "correct": True}
    assert samples[1]["prompt"] == "Reverse the word\n\nlomak"
    first = {name: (out / name).read_bytes() for name in ("metrics.json", "samples.jsonl")}
    evaluate.main()
    assert {name: (out / name).read_bytes() for name in first} == first


def test_caps_on_validation_tokens_and_prompts(tmp_path, loaded, monkeypatch):
    make_project(tmp_path, loaded)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["evaluate"].update(max_val_tokens=17, num_prompts=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    evaluate.main()
    metrics = json.loads((tmp_path / "outputs" / "eval" / "metrics.json").read_text())["eval"]
    assert metrics["val_tokens"] == 17 and metrics["val_loss_tokens"] == 8  # odd positions 1..15
    assert metrics["n_prompts"] == 1 and metrics["exact_match"] == 1.0


def test_no_prompts_path_skips_generation(tmp_path, loaded, monkeypatch):
    make_project(tmp_path, loaded)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["evaluate"]["prompts_path"] = ""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    evaluate.main()
    metrics = json.loads((tmp_path / "outputs" / "eval" / "metrics.json").read_text())["eval"]
    assert metrics["exact_match"] is None and metrics["n_prompts"] == 0
    assert (tmp_path / "outputs" / "eval" / "samples.jsonl").read_text() == ""


def test_missing_export_says_to_run_the_train_stage(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"model_name": "never-trained"}}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"models/never-trained not found: run the train stage first"):
        evaluate.main()


def test_bundled_held_out_prompts_for_a_model_of_other_data_are_warned_about(tmp_path, monkeypatch):
    from stages.lib.base.params import RenderParams, SourceParams

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "eval").mkdir(parents=True)
    sample_like = json.dumps({"instruction": "What is 2 + 3?", "input": "", "output": "5", "task": "add"}) + "\n"
    (tmp_path / "data" / "eval" / "heldout.jsonl").write_text(sample_like)
    path = "data/eval/heldout.jsonl"
    assert evaluate.heldout_warnings(path, RenderParams()) == []  # the sample's prompts for the sample's model
    [warning] = evaluate.heldout_warnings(path, RenderParams(data_path="data/raw"))
    assert "bundled sample's held-out prompts" in warning and "'data/raw'" in warning and 'set it to ""' in warning
    mixed = RenderParams(data_path="data", sources=[SourceParams(path="data/sample"), SourceParams(path="data/x")])
    assert evaluate.heldout_warnings(path, mixed) == []
    own = json.dumps({"instruction": "Summarise.", "input": "text", "output": "short"}) + "\n"
    (tmp_path / "data" / "eval" / "heldout.jsonl").write_text(own)
    assert evaluate.heldout_warnings(path, RenderParams(data_path="data/raw")) == []
    (tmp_path / "mine.jsonl").write_text(own)
    [warning] = evaluate.heldout_warnings("mine.jsonl", RenderParams(data_path="data/raw"))
    assert "outside data/eval/, the folder dvc.yaml tracks" in warning
    assert evaluate.heldout_warnings("", RenderParams(data_path="data/raw")) == []
