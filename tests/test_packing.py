"""Whole documents packed into one sample: attention stays inside each document, through the model's own attention."""

import numpy as np
import torch

from stages.lib.base.params import ModelParams
from stages.lib.modeling.families import keeps_documents_apart, new_model, pick_document_attention
from stages.lib.modeling.loss import make_loss_fn, one_row
from stages.lib.tokenizing.batches import IGNORE_INDEX, Batch, PackedDocuments

VOCAB, SEQ = 64, 32


def tiny_model():
    model = new_model(ModelParams(n_layer=2, hidden_size=32, n_head=4, max_position_embeddings=SEQ), VOCAB,
                      {"eos_token_id": 0}, seed=0)
    return model.eval()


def packed(docs):
    """One sample holding `docs` (arrays of ids, EOS included) in this order, everything counted."""
    ids = np.concatenate(docs).astype(np.uint16)
    starts = np.cumsum([0] + [len(d) for d in docs[:-1]])
    samples = PackedDocuments(ids, np.ones(len(ids), np.uint8), starts, SEQ)  # no seed: the files' order
    assert samples.count == 1
    return samples.gather(np.array([0]))


def parts(batch):
    return batch.inputs, batch.labels, batch.positions


def only(batch, document, docs):
    """The batch with labels kept for one document alone."""
    bounds = np.cumsum([0] + [len(d) - 1 for d in docs])  # each document makes len - 1 predictions
    labels = torch.full_like(batch.labels, IGNORE_INDEX)
    a, b = bounds[document], bounds[document + 1]
    labels[:, a:b] = batch.labels[:, a:b]
    return Batch(batch.inputs, labels, batch.positions)


def three_documents(seed):
    rng = np.random.default_rng(seed)
    return [np.append(rng.integers(2, VOCAB, n), 0) for n in (7, 9, 6)]


def test_changing_one_document_leaves_the_losses_of_the_others_in_the_sample_unchanged():
    loss_sum = make_loss_fn(tiny_model())
    docs = three_documents(0)
    changed = [docs[0], np.append(np.random.default_rng(9).integers(2, VOCAB, 9), 0), docs[2]]
    with torch.no_grad():
        for kept in (0, 2):
            before = loss_sum(*parts(only(packed(docs), kept, docs)))
            after = loss_sum(*parts(only(packed(changed), kept, changed)))
            assert torch.equal(before, after), kept
        # The middle document's own loss does change, and without the document positions so would the last one's.
        assert loss_sum(*parts(only(packed(docs), 1, docs))) != loss_sum(
            *parts(only(packed(changed), 1, changed)))
        stream_like = [Batch(b.inputs, b.labels) for b in (only(packed(docs), 2, docs),
                                                          only(packed(changed), 2, changed))]
        assert loss_sum(*parts(stream_like[0])) != loss_sum(*parts(stream_like[1]))


def test_a_packed_sample_scores_each_document_as_if_it_were_alone():
    model = tiny_model()
    loss_sum = make_loss_fn(model)
    docs = three_documents(1)
    with torch.no_grad():
        together = loss_sum(*parts(packed(docs)))
        alone = sum(loss_sum(torch.tensor(d[:-1][None], dtype=torch.long), torch.tensor(d[1:][None],
                             dtype=torch.long)) for d in docs)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_a_batch_flattened_into_one_row_for_the_variable_length_kernel_keeps_its_loss():
    model = tiny_model()
    loss_sum = make_loss_fn(model)
    ids = np.random.default_rng(2).integers(2, VOCAB, 200).astype(np.uint16)
    samples = PackedDocuments(ids, np.ones(200, np.uint8), np.arange(0, 200, 13), SEQ)
    batch = samples.gather(np.arange(3))
    with torch.no_grad():
        torch.testing.assert_close(loss_sum(*one_row(*parts(batch))),
                                   loss_sum(*parts(batch)), rtol=1e-5, atol=1e-5)
    # On a CPU the block-diagonal mask of scaled-dot-product attention is the way.
    assert pick_document_attention(model, torch.device("cpu"), None) == "sdpa"


def test_a_model_whose_attention_ignores_document_positions_is_caught(monkeypatch):
    model = tiny_model()
    assert keeps_documents_apart(model) and not model.training
    import transformers.masking_utils as masking
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)  # one causal window
    assert not keeps_documents_apart(model)
