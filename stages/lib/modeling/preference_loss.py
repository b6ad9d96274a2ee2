"""The preference objectives (train.objective dpo or orpo) on batches of pairs (stages/lib/tokenizing/pairs.py).

A batch of B pairs is 2B rows, the chosen sequences then the rejected ones; labels count only answer tokens. Each
row's log-probability is the sum of its answer tokens' log-probabilities (as TRL's DPO sums them).

- DPO (sigmoid, Rafailov et al. 2023): with the policy's log-probabilities pc, pr and the reference model's rc, rr,
  loss = -log sigmoid(beta * ((pc - rc) - (pr - rr))); rewards are beta * (pc - rc) and beta * (pr - rr).
  The reference is either given with the batch (train.reference: precomputed, the reference stage's scores) or,
  with LoRA, the same model with its adapters switched off (adapters_off), scored without gradients in the same
  forward call.
- ORPO (Hong et al. 2024), no reference: with the mean log-probability per answer token lc, lr,
  log odds = (lc - lr) - (log(1 - exp(lc)) - log(1 - exp(lr))), and loss = NLL(chosen) - beta * log sigmoid(log odds),
  NLL(chosen) = -lc (the chosen answer's mean token loss, per pair); rewards are beta * lc and beta * lr.

The module returns the sum of the pairs' losses: the loop divides by the pairs of the global batch, as it divides
the SFT loss by the counted tokens. It adds up, detached, what the logs show per step (`take_metrics`): the mean
rewards, their margin and the share of pairs whose chosen reward beats the rejected one (rewards/accuracy).
"""

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from stages.lib.modeling.families import has_plain_head
from stages.lib.modeling.loss import LOGITS_PER_CHUNK
from stages.lib.tokenizing.batches import IGNORE_INDEX

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy")


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, ...]:
    """(loss per pair, chosen rewards, rejected rewards) from the rows' log-probabilities (2B: chosen, rejected)."""
    chosen, rejected = (policy - reference).chunk(2)
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return losses, beta * chosen.detach(), beta * rejected.detach()


def orpo_loss(mean_logps: torch.Tensor, beta: float) -> tuple[torch.Tensor, ...]:
    """(loss per pair, chosen rewards, rejected rewards) from the rows' mean token log-probabilities."""
    chosen, rejected = mean_logps.chunk(2)
    log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
    losses = -chosen - beta * F.logsigmoid(log_odds)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def sequence_logps(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(sum of the counted tokens' log-probabilities, counted tokens) per row, in fp32.

    With a plain head the logits are computed for the counted positions only (the prompts and padding never need
    vocabulary-sized rows), a chunk of rows at a time, each chunk recomputed in the backward pass rather than kept:
    the same bound on memory as the SFT loss's chunked head (stages/lib/modeling/loss.py).
    """
    labels = labels.to(inputs.device)
    counted = labels != IGNORE_INDEX
    rows, columns = counted.nonzero(as_tuple=True)
    targets = labels[rows, columns]
    if has_plain_head(model):
        hidden = model.base_model(input_ids=inputs, use_cache=False).last_hidden_state[rows, columns]
        head = model.get_output_embeddings()
        step = max(1, LOGITS_PER_CHUNK // head.weight.shape[0])
        keep_nothing = torch.is_grad_enabled()
        token_logps = torch.cat([
            checkpoint(_token_logps, hidden[at:at + step], head.weight, head.bias, targets[at:at + step],
                       use_reentrant=False) if keep_nothing else
            _token_logps(hidden[at:at + step], head.weight, head.bias, targets[at:at + step])
            for at in range(0, len(targets), step)]) if len(targets) else hidden.sum(-1) * 0.0
    else:
        logits = model(input_ids=inputs, use_cache=False).logits[rows, columns]
        token_logps = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
    sums = torch.zeros(len(inputs), dtype=torch.float32, device=inputs.device).index_add(0, rows, token_logps.float())
    return sums, counted.sum(dim=1)


def _token_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module):
    """The model as its base alone: every LoRA layer's adapters bypassed, without touching requires_grad."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer._disable_adapters = was


class PreferenceLossModule(torch.nn.Module):
    """The model and a preference objective as one module: forward(inputs, labels, reference) -> sum of the pairs'
    losses. Like LossModule, what DDP wraps and FSDP shards; the model is the child `model`."""

    def __init__(self, model: torch.nn.Module, objective: str, beta: float):
        super().__init__()
        self.model, self.objective, self.beta = model, objective, beta
        self._sums: torch.Tensor | None = None  # chosen, rejected and margin rewards, accurate pairs, pairs

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor,
                reference: torch.Tensor | None = None) -> torch.Tensor:
        """Sum over the batch's pairs of their loss (`reference`: the rows' reference log-probabilities, or None to
        score the model with its adapters off)."""
        logps, counts = sequence_logps(self.model, inputs, labels)
        if self.objective == "orpo":
            losses, chosen, rejected = orpo_loss(logps / counts.clamp_min(1), self.beta)
        else:
            if reference is None:
                with torch.no_grad(), adapters_off(self.model):
                    reference = sequence_logps(self.model, inputs, labels)[0]
            losses, chosen, rejected = dpo_loss(logps, reference.to(logps), self.beta)
        self._add(chosen, rejected)
        return losses.sum()

    def _add(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        sums = torch.stack([chosen.sum(), rejected.sum(), (chosen - rejected).sum(),
                            (chosen > rejected).float().sum(), torch.tensor(float(len(chosen)), device=chosen.device)])
        self._sums = sums if self._sums is None else self._sums + sums

    def take_metrics(self) -> torch.Tensor | None:
        """The sums added up since the last call (chosen, rejected, margin, accurate, pairs), and start again."""
        sums, self._sums = self._sums, None
        return sums


def metrics_from(sums: torch.Tensor) -> dict:
    """The logged means (METRICS) from sums over all processes."""
    chosen, rejected, margin, accurate, pairs = sums.tolist()
    pairs = max(pairs, 1.0)
    return dict(zip(METRICS, (chosen / pairs, rejected / pairs, margin / pairs, accurate / pairs)))


def pair_scores(model: torch.nn.Module, samples, pairs_per_batch: int = 8) -> np.ndarray:
    """(summed log-probability, answer tokens) of each pair's chosen and rejected answers under `model`, as an array
    of pairs x 2 x 2 (float64), without gradients: the reference stage's scores, and evaluate's."""
    rows = []
    with torch.no_grad():
        for first in range(0, samples.count, pairs_per_batch):
            batch = samples.gather(np.arange(first, min(samples.count, first + pairs_per_batch))).to(model.device)
            logps, counts = sequence_logps(model, batch.inputs, batch.labels)
            both = torch.stack([logps.double(), counts.double()], dim=1).cpu()  # rows x 2
            rows.append(torch.stack(both.chunk(2), dim=1).numpy())  # pairs x (chosen, rejected) x 2
    return np.concatenate(rows) if rows else np.zeros((0, 2, 2))
