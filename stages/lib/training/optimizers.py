"""The optimizer a session trains with (train.optimizer). Weight decay applies to matrices, embeddings included, not
to norms or biases. Embeddings and head trained beside LoRA adapters (train.lora.train_embeddings) form a group of
their own at train.embedding_lr.

- `adamw`: torch's fused AdamW, two fp32 moments per trained parameter (8 bytes).
- `adamw8bit`: bitsandbytes' 8-bit AdamW: the moments of every tensor of 4,096 values or more held in 8 bits,
  quantized block-wise (about 2 bytes per parameter with its block constants); smaller tensors keep fp32 moments.
  Its state is tensors too (the 8-bit moments, their quantization maps and block maxima), which the checkpoint's
  optimizer part stores in safetensors as it does AdamW's (stages/lib/checkpointing/parts.py).
"""

import torch

from stages.lib.base.params import TrainParams

EMBEDDING_LR_SHARE = 0.1  # train.embedding_lr = 0: a tenth of train.lr, as continued pretraining usually does


def make_optimizer(model, train: TrainParams) -> torch.optim.Optimizer:
    """The optimizer train.optimizer names over `model`'s trained parameters (see the module docstring)."""
    groups = parameter_groups(model, train)
    if train.optimizer == "adamw8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(groups, lr=train.lr, betas=(train.beta1, train.beta2))
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), fused=True)


def parameter_groups(model, train: TrainParams) -> list[dict]:
    """Matrices with weight decay, norms and biases without; with train.lora.train_embeddings, the trained copies of
    the embeddings and head (PEFT's modules_to_save) in a third group, whose `lr_scale` the loop multiplies the
    scheduled rate by."""
    embeddings = {id(p) for name, p in model.named_parameters() if p.requires_grad and ".modules_to_save." in name}
    trained = [p for p in model.parameters() if p.requires_grad and id(p) not in embeddings]
    groups = [{"params": [p for p in trained if p.dim() >= 2], "weight_decay": train.weight_decay},
              {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0}]
    if embeddings:
        scale = train.embedding_lr / train.lr if train.embedding_lr else EMBEDDING_LR_SHARE
        groups.append({"params": [p for p in model.parameters() if id(p) in embeddings],
                       "weight_decay": train.weight_decay, "lr_scale": scale})
    return groups


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled rate for this step in every group (times the group's lr_scale, where it has one)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
