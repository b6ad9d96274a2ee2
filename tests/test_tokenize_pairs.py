"""Token files for preference pairs: prompt and answers encoded apart, the mask on the answers and their EOS, the
pairs beside the SFT token files, and the samples training cuts from them (truncation as TRL's default)."""

from pathlib import Path

import numpy as np
import pytest
from conftest import save_tokenizer
from test_render import in_tmp, jsonl, run, write  # noqa: F401

from stages.lib.base.params import TokenizeParams
from stages.lib.tokenizing.batches import IGNORE_INDEX, TrainBatches
from stages.lib.tokenizing.pairs import PreferencePairs, fit_pair, pair_samples, read_pairs
from stages.lib.tokenizing.token_files import read_meta
from stages.tokenize import print_summary, tokenize_records

EOS = 0  # the word-level test tokenizer's first special


def word(i: int) -> str:
    return f"t{i}"


def ids(text: str) -> list[int]:
    """Ids of the test tokenizer's words t2, t3, ... (word ti has id i)."""
    return [int(w[1:]) for w in text.split()]


PAIRS = [{"prompt": "t10 t11 t12", "chosen": " t20 t21", "rejected": " t30"},
         {"prompt": "t13", "chosen": " t22 t23 t24", "rejected": " t31 t32"},
         {"prompt": "t14 t15", "chosen": " t25", "rejected": " t33 t34 t35"},
         {"prompt": "t16", "chosen": " t26", "rejected": " t36"}]


@pytest.fixture
def tokens():
    save_tokenizer(Path("tokenizer"))
    write("raw/p.jsonl", jsonl(*PAIRS))
    run("raw/p.jsonl")
    meta = tokenize_records(Path("out/records.jsonl"), Path("tokenizer"),
                            Path("tokens"), TokenizeParams(val_ratio=0.25, shuffle=False))
    return meta


def test_pairs_are_written_beside_the_sft_files_with_prompt_and_answers_apart(tokens, capsys):
    meta = read_meta("tokens")
    assert meta["pairs"]["train"]["pairs"] == 3 and meta["pairs"]["val"]["pairs"] == 1
    assert meta["splits"]["train"]["documents"] == 3  # the SFT files hold prompt + chosen
    train = read_pairs("tokens", "train")
    for i, pair in enumerate(PAIRS[:3]):
        prompt, chosen, chosen_mask, rejected, rejected_mask = train.pair(i)
        assert prompt.tolist() == ids(pair["prompt"])
        assert chosen.tolist() == ids(pair["chosen"]) + [EOS] and chosen_mask.tolist() == [1] * len(chosen)
        assert rejected.tolist() == ids(pair["rejected"]) + [EOS] and rejected_mask.all()
    assert read_pairs("tokens", "val").pair(0)[0].tolist() == ids(PAIRS[3]["prompt"])
    capsys.readouterr()
    print_summary(meta)
    assert "tokenize: train: 3 preference pairs, 24 tokens" in capsys.readouterr().out


def test_a_batch_holds_the_chosen_rows_then_the_rejected_rows_with_only_answers_counted(tokens):
    samples = pair_samples("tokens", "train", seq_len=8, required=True)
    batch = samples.gather(np.array([0, 1]))
    whole = samples.gather(np.arange(3))
    assert samples.facts()["padding_share"] == pytest.approx(float((whole.inputs == 0).double().mean()))
    assert batch.inputs.shape == (4, 8) and batch.counted() == 2
    assert batch.inputs[0, :5].tolist() == [10, 11, 12, 20, 21]
    assert batch.labels[0, :5].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 20, 21, EOS]
    assert (batch.labels[0, 5:] == IGNORE_INDEX).all()
    assert batch.inputs[2, :4].tolist() == [10, 11, 12, 30]
    assert batch.labels[2, :4].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 30, EOS]
    assert batch.labels[3, :4].tolist() == [31, 32, EOS, IGNORE_INDEX]  # pair 1 rejected: prompt t13 only


def test_long_pairs_lose_the_prompt_start_and_the_answer_end_and_are_counted(tokens):
    samples = pair_samples("tokens", "train", seq_len=4, required=True)
    assert samples.facts()["pairs_cut"] == 2  # pair 1 (1 + 4 tokens) fits
    batch = samples.gather(np.array([0]))
    # limit 5 tokens: the answers (3 and 2 tokens) leave 2 for the prompt, which keeps its end
    assert batch.inputs[0].tolist() == [11, 12, 20, 21]
    assert batch.labels[0].tolist() == [IGNORE_INDEX, 20, 21, EOS]


@pytest.mark.parametrize("prompt,chosen,rejected,limit,expected", [
    (3, 2, 1, 10, (3, 2)), (8, 6, 2, 10, (5, 5)), (2, 20, 3, 10, (2, 8)), (20, 2, 1, 10, (8, 2))])
def test_fit_pair(prompt, chosen, rejected, limit, expected):
    kept, answer = fit_pair(prompt, chosen, rejected, limit)
    assert (kept, answer) == expected and kept + answer <= limit
    assert kept <= prompt


def test_pairs_train_in_the_same_resumable_order_as_documents(tokens):
    samples = pair_samples("tokens", "train", seq_len=8, required=True)
    assert isinstance(samples, PreferencePairs)
    one, again = (TrainBatches(samples, seed=3, batch_size=1, grad_accum=2) for _ in range(2))
    assert all((a.inputs == b.inputs).all() for a, b in zip(one.step_batches(5), again.step_batches(5)))
    assert one.cursor(3).documents_in_epoch == 0 and one.cursor(1).samples_seen == 2


def test_sft_only_token_files_have_no_pairs(tmp_path):
    save_tokenizer(tmp_path / "tokenizer")
    write("raw/i.jsonl", jsonl({"instruction": "t5", "output": "t6"}, {"instruction": "t7", "output": "t8"}))
    run("raw/i.jsonl")
    tokenize_records(Path("out/records.jsonl"), tmp_path / "tokenizer", tmp_path / "tokens",
                     TokenizeParams(val_ratio=0.5))
    assert "pairs" not in read_meta(tmp_path / "tokens") and read_pairs(tmp_path / "tokens", "train") is None
    with pytest.raises(Exception, match="no preference pairs"):
        pair_samples(tmp_path / "tokens", "train", 8, required=True)
