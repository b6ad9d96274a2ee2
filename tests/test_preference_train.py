"""Preference tuning (train.objective dpo and orpo) on tiny random Llama models: the losses equal their formulas on
the model's own logits (and TRL's, where TRL is installed), the reference is the base with the adapters off or the
reference stage's scores, split sessions equal one bitwise, and the rewards are logged."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from test_families import base_model
from train_helpers import VOCAB, inside, make_workspace, read_tsv, run_stage, session, tiny_params
from transformers import AutoModelForCausalLM

from stages.lib.base.params import ParamError, load_params
from stages.lib.modeling import lora
from stages.lib.modeling.preference_loss import PreferenceLossModule, adapters_off, dpo_loss, orpo_loss
from stages.lib.tokenizing.pairs import PairWriter, pair_samples, read_reference
from stages.lib.tokenizing.token_files import read_meta, write_meta
from stages.lib.training.decision import fingerprint_values
from stages.lib.training.preference_runs import preference_metrics
from stages.reference import score_pairs

LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0}
SAME_RUN_FILES = ("optimizer.safetensors", "optimizer.json", "rng.json")


def add_pairs(tokens, n_train: int = 24, n_val: int = 6, seed: int = 0) -> None:
    """Pair files beside a workspace's token files: the chosen answer continues the prompt's pattern (+1 per
    token), the rejected one is random."""
    rng = np.random.default_rng(seed)
    meta = read_meta(tokens)
    for split, n in (("train", n_train), ("val", n_val)):
        with PairWriter(tokens, split, meta["dtype"]) as writer:
            for _ in range(n):
                prompt = rng.integers(2, VOCAB, int(rng.integers(3, 9)))
                chosen = (prompt[-1] + np.arange(1, int(rng.integers(2, 6))) - 2) % (VOCAB - 2) + 2
                rejected = rng.integers(2, VOCAB, int(rng.integers(2, 6)))
                ones = [np.ones(len(a) + 1, np.uint8) for a in (chosen, rejected)]
                writer.write(prompt, (np.append(chosen, 0), ones[0]), (np.append(rejected, 0), ones[1]))
        meta.setdefault("pairs", {})[split] = writer.summary()
    write_meta(tokens, meta)


def workspace(root, **kw):
    make_workspace(root, prompts=True)
    add_pairs(root / "data" / "tokens", **kw)
    return root


def row_logps(model, batch):
    """Each row's summed answer log-probability, straight from the model's logits."""
    logits = model(input_ids=batch.inputs).logits.float()
    logps = torch.log_softmax(logits, -1)
    counted = batch.labels != -100
    picked = logps.gather(2, batch.labels.clamp_min(0)[..., None]).squeeze(2)
    return (picked * counted).sum(1), counted.sum(1)


def test_dpo_and_orpo_losses_equal_their_formulas_on_a_tiny_models_logits(tmp_path):
    root = workspace(tmp_path / "w")
    model = base_model("llama", tmp_path / "base").eval()
    batch = pair_samples(root / "data" / "tokens", "train", 16, True).gather(np.arange(4))
    reference = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) - 20
    with torch.no_grad():
        logps, counts = row_logps(model, batch)
        dpo = PreferenceLossModule(model, "dpo", 0.25)(batch.inputs, batch.labels, reference)
        orpo = PreferenceLossModule(model, "orpo", 0.5)(batch.inputs, batch.labels)
    expected_dpo = expected_orpo = 0.0
    for i in range(4):
        pc, pr, rc, rr = logps[i].item(), logps[4 + i].item(), reference[i].item(), reference[4 + i].item()
        expected_dpo += -math.log(1 / (1 + math.exp(-0.25 * ((pc - rc) - (pr - rr)))))
        lc, lr = pc / counts[i].item(), pr / counts[4 + i].item()
        odds = (lc - lr) - (math.log(1 - math.exp(lc)) - math.log(1 - math.exp(lr)))
        expected_orpo += -lc - 0.5 * math.log(1 / (1 + math.exp(-odds)))
    assert dpo.item() == pytest.approx(expected_dpo, rel=1e-5)
    assert orpo.item() == pytest.approx(expected_orpo, rel=1e-5)


def test_losses_match_trl_where_it_is_installed():
    trl = pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DPOTrainer  # noqa: F401  (the formulas are instance methods; compared below)
    g = torch.Generator().manual_seed(0)
    policy, reference = torch.randn(8, generator=g) - 10, torch.randn(8, generator=g) - 10
    losses, chosen, rejected = dpo_loss(policy, reference, 0.1)
    logits = 0.1 * ((policy[:4] - policy[4:]) - (reference[:4] - reference[4:]))
    torch.testing.assert_close(losses, -F.logsigmoid(logits))
    assert trl.__version__


def test_orpo_rewards_are_beta_times_the_mean_token_log_probability():
    mean = torch.tensor([-0.5, -1.0, -2.0, -0.25])
    losses, chosen, rejected = orpo_loss(mean, 0.2)
    torch.testing.assert_close(chosen, 0.2 * mean[:2])
    torch.testing.assert_close(rejected, 0.2 * mean[2:])
    assert (losses > 0).all()


def test_with_adapters_off_the_reference_is_the_base_alone(tmp_path):
    root = workspace(tmp_path / "w")
    base = base_model("llama", tmp_path / "base").eval()
    model = lora.add_adapters(base_model("llama", tmp_path / "copy"), tiny_params(lora=LORA, init_from="x").lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval()
    batch = pair_samples(root / "data" / "tokens", "train", 16, True).gather(np.arange(3))
    with torch.no_grad():
        with adapters_off(model):
            off = row_logps(model, batch)[0]
        on = row_logps(model, batch)[0]
        torch.testing.assert_close(off, row_logps(base, batch)[0])
        assert not torch.allclose(on, off)
        live = PreferenceLossModule(model, "dpo", 0.1)(batch.inputs, batch.labels)
        given = PreferenceLossModule(model, "dpo", 0.1)(batch.inputs, batch.labels, off)
    torch.testing.assert_close(live, given)
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


def dpo_lora_run(base, **overrides):
    return {"init_from": str(base), "lora": LORA, "objective": "dpo", "reference": "adapters_off",
            "total_step_budget": 6, "save_every": 2, "eval_every": 2, "batch_size": 2, "lr": 5e-3, **overrides}


@pytest.mark.parametrize("quantize", ["none", "nf4"])  # nf4: DPO on a 4-bit base (QLoRA), the reference adapters-off
def test_dpo_with_lora_three_sessions_equal_one_bitwise_and_log_the_rewards(tmp_path, quantize):
    base_model("llama", tmp_path / "base")
    run = dpo_lora_run(tmp_path / "base", grad_accum=2, lora={**LORA, "quantize": quantize})
    whole, split = workspace(tmp_path / "whole"), workspace(tmp_path / "split")
    session(whole, **run)
    assert [session(split, steps_today=2, **run).start_step for _ in range(3)] == [0, 2, 4]
    last = "checkpoints/step-00000006"
    for name in ("adapters.safetensors", *SAME_RUN_FILES):
        assert (split / last / name).read_bytes() == (whole / last / name).read_bytes(), name
    for metric in ("train/loss", "train/rewards/accuracy", "train/rewards/margin", "val/rewards/accuracy"):
        assert read_tsv(split, metric) == read_tsv(whole, metric) and len(read_tsv(whole, metric)) >= 3, metric
    first_loss = float(read_tsv(whole, "train/loss")[0][1])
    assert first_loss == pytest.approx(math.log(2), abs=1e-6)  # the adapters start at zero: policy == reference
    state = json.loads((whole / last / "state.json").read_text())
    assert state["fingerprint_values"]["objective"] == "dpo" and state["fingerprint_values"]["packing"] == "pairs"
    assert state["fingerprint_values"].get("lora.quantize", "none") == quantize


def test_dpo_full_fine_tune_with_precomputed_reference_three_sessions_equal_one_bitwise(tmp_path):
    base_model("llama", tmp_path / "base")
    run = {**dpo_lora_run(tmp_path / "base", reference="precomputed"), "lora": {"r": 0}}
    whole, split = workspace(tmp_path / "whole"), workspace(tmp_path / "split")
    for root in (whole, split):
        with inside(root):
            facts = score_pairs(tiny_params(**run), root / "data" / "tokens", root / "data" / "tokenizer",
                                root / "data" / "reference")
    assert facts["scores"] and set(facts["pairs_sha256"]) == {"train", "val"}
    scores = read_reference(whole / "data" / "reference", "train", {"seq_len": 16})
    assert scores.shape == (24, 2) and (scores < 0).all()
    session(whole, **run)
    assert [session(split, steps_today=2, **run).start_step for _ in range(3)] == [0, 2, 4]
    last = "checkpoints/step-00000006"
    for name in ("model.safetensors", *SAME_RUN_FILES):
        assert (split / last / name).read_bytes() == (whole / last / name).read_bytes(), name
    # The reference is the starting model: the first step's loss is log 2.
    assert float(read_tsv(whole, "train/loss")[0][1]) == pytest.approx(math.log(2), abs=1e-5)


def test_a_run_without_reference_scores_or_with_stale_ones_says_to_run_the_reference_stage(tmp_path):
    base_model("llama", tmp_path / "base")
    run = {**dpo_lora_run(tmp_path / "base", reference="precomputed"), "lora": {"r": 0}}
    root = workspace(tmp_path / "w")
    with pytest.raises(Exception, match="run the reference stage"):
        session(root, **run)
    with inside(root):
        score_pairs(tiny_params(**run), root / "data" / "tokens", root / "data" / "tokenizer",
                    root / "data" / "reference")
    with pytest.raises(Exception, match=r"other seq_len .*run the reference stage"):
        session(root, **{**run, "seq_len": 12})


def test_the_reference_stage_is_a_quick_note_for_other_objectives(tmp_path):
    facts = score_pairs(tiny_params(), tmp_path / "none", tmp_path / "none", tmp_path / "reference")
    assert facts["scores"] is False and "sft" in facts["why"]
    assert sorted(p.name for p in (tmp_path / "reference").iterdir()) == ["reference.json"]


def test_objective_and_beta_join_the_fingerprint_and_leave_an_sft_runs_as_it_was(tmp_path):
    root = workspace(tmp_path / "w")
    meta = read_meta(root / "data" / "tokens")
    sft = fingerprint_values(tiny_params(init_from="b"), meta, 1, "abc")
    assert "objective" not in sft and "beta" not in sft
    dpo = fingerprint_values(tiny_params(init_from="b", objective="dpo"), meta, 1, "abc")
    other_beta = fingerprint_values(tiny_params(init_from="b", objective="dpo", beta=0.5), meta, 1, "abc")
    orpo = fingerprint_values(tiny_params(objective="orpo"), meta, 1, None)
    assert dpo["objective"] == "dpo" and dpo["beta"] != other_beta["beta"] and orpo["reference"] is None
    assert dpo["train_pairs_sha256"] == meta["pairs"]["train"]["sha256"]


def test_settings_are_checked(tmp_path):
    def params(**train):
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": train}))
        return load_params(tmp_path / "params.yaml")

    with pytest.raises(ParamError, match=r"train.objective = 'dpo' .* train.init_from is empty"):
        params(objective="dpo")
    with pytest.raises(ParamError, match=r"adapters_off.*train.lora.r is 0"):
        params(objective="dpo", init_from="b", reference="adapters_off")
    with pytest.raises(ParamError, match=r"train.objective"):
        params(objective="kto")
    assert params(objective="orpo", beta=0.5).train.beta == 0.5


def test_orpo_from_scratch_trains_and_logs_the_rewards(tmp_path):
    root = workspace(tmp_path / "w")
    result = session(root, objective="orpo", beta=0.2, total_step_budget=4, batch_size=2)
    assert result.end_step == 4
    assert len(read_tsv(root, "train/rewards/chosen")) == 4
    assert (root / "models" / "tiny" / "config.json").is_file()


def test_evaluate_reports_preference_accuracy_and_margin_on_the_validation_pairs(tmp_path):
    base = base_model("llama", tmp_path / "base").eval()
    run = dpo_lora_run(tmp_path / "base", lr=2e-2)
    root = workspace(tmp_path / "w")
    session(root, **run)
    train, tokens = tiny_params(**run), root / "data" / "tokens"
    exported = AutoModelForCausalLM.from_pretrained(root / "models" / "tiny").eval()
    with inside(root):
        before = preference_metrics(base, train, tokens, root / "data" / "tokenizer")
        after = preference_metrics(exported, train, tokens, root / "data" / "tokenizer")
    assert before == {"pref_accuracy": 0.0, "pref_margin": 0.0, "pref_pairs": 6}  # the base is its own reference
    batch = pair_samples(tokens, "val", 16, True).gather(np.arange(6))
    with torch.no_grad():
        margins = 0.1 * ((row_logps(exported, batch)[0] - row_logps(base, batch)[0]).double().reshape(2, 6))
    margins = margins[0] - margins[1]
    assert after["pref_pairs"] == 6
    assert after["pref_margin"] == pytest.approx(margins.mean().item(), abs=1e-5)
    assert after["pref_accuracy"] == pytest.approx((margins > 0).double().mean().item())
    assert preference_metrics(exported, tiny_params(), tokens, root / "data" / "tokenizer") == {}  # an SFT run


def test_dpo_on_two_processes_trains_as_one_process_with_the_same_global_batch(tmp_path):
    base_model("llama", tmp_path / "base")
    run = dpo_lora_run(tmp_path / "base", total_step_budget=4, save_every=4, eval_every=4)
    one, two = workspace(tmp_path / "one"), workspace(tmp_path / "two")
    session(one, **run, grad_accum=2)
    done = run_stage(two, **run, grad_accum=1, devices=2)
    assert done.returncode == 0, done.stdout + done.stderr
    last = "checkpoints/step-00000004/adapters.safetensors"
    mine, theirs = load_file(one / last), load_file(two / last)
    assert mine.keys() == theirs.keys()
    for name in mine:
        torch.testing.assert_close(theirs[name], mine[name], rtol=1e-4, atol=1e-6)
    for metric in ("train/loss", "train/rewards/accuracy", "train/rewards/margin"):
        ours, other = ([float(v) for _, v in read_tsv(root, metric)] for root in (one, two))
        assert other == pytest.approx(ours, rel=1e-4, abs=1e-6), metric


def test_the_chunked_head_gives_the_same_loss_and_gradients(tmp_path, monkeypatch):
    from stages.lib.modeling import preference_loss
    root = workspace(tmp_path / "w")
    model = base_model("llama", tmp_path / "base").eval()
    batch = pair_samples(root / "data" / "tokens", "train", 16, True).gather(np.arange(4))
    results = []
    for rows_per_chunk in (None, 3):
        if rows_per_chunk:
            monkeypatch.setattr(preference_loss, "LOGITS_PER_CHUNK", VOCAB * rows_per_chunk)
        model.zero_grad()
        loss = PreferenceLossModule(model, "orpo", 0.1)(batch.inputs, batch.labels)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0])
    for chunked, whole in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-6)
