"""Reference stage: the reference model's log-probabilities of every preference pair, computed once per pairs and base.

    python -m stages.reference      (dvc repro reference)

DPO compares the model it trains with a reference model, the model the run starts from (train.init_from: the base,
or the export of an SFT run). With `train.reference: precomputed` this stage scores each pair's chosen and rejected
answers with it, once, and writes the scores to data/reference/ (`<split>.logps.bin`, and reference.json saying
what they were computed from: the pairs' hashes, train.seq_len, the reference model's content hash). Every session
then holds one model, and DVC reruns this stage only when the pairs or the params it reads change; a reference
model whose files changed in place is caught by the train stage, which compares the hash and asks for a rerun.

For every other run (sft, orpo, dpo with adapters_off) the stage writes only reference.json saying that no scores
are needed: it is one stage of one pipeline, and stays a quick no-op (loading no model), which DVC reruns only when
the token files or those params change.
"""

import json
import time
from pathlib import Path

from stages.lib.base.errors import run_stage
from stages.lib.base.files import replaced_folder, write_atomically
from stages.lib.base.params import TOKENIZER_DIR, TOKENS_DIR, TrainParams, load_params
from stages.lib.tokenizing.pairs import REFERENCE_META

REFERENCE_DIR = Path("data/reference")


def main() -> None:
    """Score the pairs with params.yaml's reference model into data/reference/."""
    params = load_params()
    score_pairs(params.train, TOKENS_DIR, TOKENIZER_DIR, REFERENCE_DIR, params.tokenizer.trust_remote_code)


def score_pairs(train: TrainParams, tokens_dir: Path, tokenizer_dir: Path, out_dir: Path,
                trust_remote_code: bool = False) -> dict:
    """Write the reference scores of every split's pairs into `out_dir` (or the note that none are needed); return
    reference.json's contents."""
    with replaced_folder(out_dir) as folder:
        if not (train.objective == "dpo" and train.reference == "precomputed"):
            facts = {"scores": False, "why": f"train.objective = {train.objective!r}"
                     + (f", train.reference = {train.reference!r}" if train.objective == "dpo" else "")
                     + ": no precomputed reference scores are needed"}
            write_atomically(folder / REFERENCE_META, json.dumps(facts, indent=2) + "\n")
            print(f"reference: {facts['why']}")
            return facts
        return _score(train, Path(tokens_dir), Path(tokenizer_dir), folder, trust_remote_code)


def _score(train: TrainParams, tokens_dir: Path, tokenizer_dir: Path, folder: Path, trust_remote_code: bool) -> dict:
    import numpy as np

    from stages.lib.base.devices import pick_device
    from stages.lib.modeling.families import build_model
    from stages.lib.modeling.preference_loss import pair_scores
    from stages.lib.tokenizing.loading import tokenizer_facts
    from stages.lib.tokenizing.pairs import pair_samples, write_reference
    from stages.lib.tokenizing.token_files import read_meta
    from stages.lib.training.preference_runs import reference_facts

    began = time.monotonic()
    meta = read_meta(tokens_dir)
    facts = reference_facts(train, meta)
    device = pick_device(train.device)
    # The same model the train stage starts from: same vocabulary size, same weights.
    model = build_model(train, *tokenizer_facts(tokenizer_dir, trust_remote_code, meta)).to(device).eval()
    scores = {}
    for split in facts["pairs_sha256"]:
        samples = pair_samples(tokens_dir, split, train.seq_len, required=False)
        scores[split] = pair_scores(model, samples)[:, :, 0] if samples else np.zeros((0, 2))
    facts = {"scores": True, **facts}
    write_reference(folder, scores, facts)
    pairs = sum(len(s) for s in scores.values())
    print(f"reference: scored {pairs:,} pairs with {train.init_from} in {time.monotonic() - began:.1f} s")
    return facts


if __name__ == "__main__":
    run_stage(main)
