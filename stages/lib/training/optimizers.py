"""The optimizer a session trains with. Weight decay applies to matrices, embeddings included, not to norms or
biases."""

import torch

from stages.lib.base.params import TrainParams


def make_optimizer(model, train: TrainParams) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (embeddings included) and none on norms and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), fused=True)
