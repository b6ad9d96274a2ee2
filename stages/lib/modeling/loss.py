"""The training loss: summed masked cross-entropy, computed from the last hidden states in chunks of rows.

The full (tokens x vocabulary) logits and their gradient never exist at once: on a 16M-parameter model with the
GPT-2 vocabulary they would be 2 x 412 MB per step, and the vocabulary head is most of the compute. A head with a
bias (Phi's) is computed the same way, the bias added to each chunk's logits.
`LossModule` puts the model and this loss into one module, which is what DDP wraps and FSDP shards.
"""

from typing import Callable

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from stages.lib.modeling.families import has_plain_head
from stages.lib.tokenizing.batches import IGNORE_INDEX

LOGITS_PER_CHUNK = 8 * 1024 * 1024  # about 32 MB of fp32 logits per chunk: big matmuls, small temporaries


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def make_loss_fn(model: PreTrainedModel, compile: bool = False) -> LossFn:
    """A function (inputs, labels, positions) -> sum of the token losses (labels -100 skipped), with no KV cache.

    `positions` (None: 0, 1, ... in each row) restarting at a document makes the model's own attention confine
    every document to itself (transformers builds the block-diagonal causal mask, or the variable-length kernel's
    boundaries, from position ids that restart). With a plain head the trunk runs alone and the loss comes from
    `head_loss_sum`; `compile` compiles the trunk only (the model object itself stays uncompiled, so its state-dict
    keys never gain an `_orig_mod.` prefix).
    """
    # The variable-length flash kernel reads packed documents from one row only.
    flatten = (model.config._attn_implementation or "").startswith("flash")

    def rows(inputs, labels, positions):
        return one_row(inputs, labels, positions) if flatten and positions is not None else (inputs, labels, positions)

    if has_plain_head(model):
        body = torch.compile(model.base_model) if compile else model.base_model
        head = model.get_output_embeddings()

        def head_loss(inputs: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None):
            inputs, labels, positions = rows(inputs, labels, positions)
            hidden = body(input_ids=inputs, position_ids=positions, use_cache=False).last_hidden_state
            return head_loss_sum(hidden, head.weight, labels, bias=head.bias)
        return head_loss
    full = torch.compile(model) if compile else model

    def plain_loss(inputs: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        inputs, labels, positions = rows(inputs, labels, positions)
        logits = full(input_ids=inputs, position_ids=positions, use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten().to(logits.device),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return plain_loss


def one_row(inputs: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A batch of packed documents as one row: the same documents, since positions restart at each of them."""
    return inputs.reshape(1, -1), labels.reshape(1, -1), positions.reshape(1, -1)


class LossModule(torch.nn.Module):
    """The model and its loss as one module: forward(inputs, labels) -> sum of the token losses.

    This is what DDP wraps and FSDP shards, so their hooks see the whole forward pass, the vocabulary head included
    (`make_loss_fn` alone calls the trunk and reads the head's weight directly, around the model's own forward).
    The model is the child `model`, so state-dict names are the model's own behind a `model.` prefix.
    """

    def __init__(self, model: PreTrainedModel, compile: bool = False):
        super().__init__()
        self.model = model
        self.loss_sum = make_loss_fn(model, compile=compile)

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Sum of the token losses of the batch (labels -100 skipped); see make_loss_fn for `positions`."""
        return self.loss_sum(inputs, labels, positions)


def head_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                  chunk_rows: int | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T (+ bias)` against `labels`, row chunk by row chunk.

    Only rows whose label counts are computed. With gradients wanted, each chunk's gradient is computed right
    after its loss (softmax minus one-hot), so no logits are kept for the backward pass; a frozen head (a LoRA's)
    gets none computed.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(hidden.device)
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    if len(rows) < len(labels):
        hidden, labels = hidden.index_select(0, rows), labels.index_select(0, rows)
    if len(rows) == 0:
        # No target counts: a zero loss that still reaches every parameter (the head too), so each gets a zero
        # gradient; DDP waits for a gradient of every parameter on every process and would hang without one.
        return (hidden.sum() + weight.sum() + (bias.sum() if bias is not None else 0.0)) * 0.0
    chunk_rows = chunk_rows or max(1, LOGITS_PER_CHUNK // weight.shape[0])
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return _HeadLoss.apply(hidden, weight, labels, chunk_rows, bias)
    return _head_loss_and_grads(hidden, weight, labels, chunk_rows, bias, want_grads=False)[0]


class _HeadLoss(torch.autograd.Function):
    """Loss forward with its gradients computed alongside; backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_rows, bias):
        head_trains = ctx.needs_input_grad[1] or ctx.needs_input_grad[4]
        loss, *ctx.grads = _head_loss_and_grads(hidden, weight, labels, chunk_rows, bias, True, head_trains)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # In place: these tensors belong to this call alone, and a copy would be one more vocabulary-sized buffer.
        grad_hidden, grad_weight, grad_bias = (None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in ctx.grads)
        ctx.grads = None
        return grad_hidden, grad_weight, None, None, grad_bias


def _head_loss_and_grads(hidden, weight, labels, chunk_rows, bias, want_grads, head_trains=True):
    # Under bf16 autocast the matmuls run in bf16 and the softmax in fp32; autocast is switched off inside so the
    # casts are explicit (in-place accumulation is not autocast).
    device_type = hidden.device.type
    mm_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    with torch.autocast(device_type, enabled=False):
        h_all, w = hidden.to(mm_dtype), weight.to(mm_dtype)
        b = bias.to(mm_dtype) if bias is not None else None
        # One logits buffer reused by every chunk: a fresh chunk-sized allocation each time is a fresh mmap, and
        # its page faults, for glibc malloc on CPU.
        buffer = torch.empty(min(chunk_rows, len(labels)), w.shape[0], dtype=mm_dtype, device=w.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_grads else None
        grad_weight = None
        grad_bias = (torch.zeros_like(bias, dtype=torch.float32) if want_grads and head_trains and bias is not None
                     else None)
        for start in range(0, len(labels), chunk_rows):
            h, y = h_all[start:start + chunk_rows], labels[start:start + chunk_rows]
            if b is None:
                logits = torch.mm(h, w.t(), out=buffer[:len(y)]).float()
            else:  # addmm, as nn.Linear computes it
                logits = torch.addmm(b, h, w.t(), out=buffer[:len(y)]).float()
            # log-sum-exp and softmax from one pass of exp, in place: loss = log(sum(exp(z - max))) - (z_y - max).
            logits.sub_(logits.amax(dim=1, keepdim=True))
            target = logits.gather(1, y[:, None])
            sums = logits.exp_().sum(dim=1, keepdim=True)
            loss += (sums.log() - target).sum()
            if not want_grads:
                continue
            probs = logits.div_(sums)  # softmax
            probs[torch.arange(len(y), device=y.device), y] -= 1.0  # minus the one-hot target
            if grad_bias is not None:
                grad_bias += probs.sum(dim=0)
            g = probs.to(mm_dtype)
            grad_hidden[start:start + chunk_rows] = g @ w
            if not head_trains:
                continue
            if grad_weight is None:
                grad_weight = (g.t() @ h).float()
            elif mm_dtype == torch.float32:
                grad_weight.addmm_(g.t(), h)
            else:
                grad_weight += (g.t() @ h).float()
    if want_grads and head_trains:
        grad_weight = grad_weight.to(weight.dtype)
        grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
    return loss, grad_hidden, grad_weight, grad_bias
