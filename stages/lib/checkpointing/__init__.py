"""The checkpoint: its named parts and their files (weights, optimizer, RNG, data cursor, loss scaler, DVCLive
snapshot), where checkpoints live (the store: find, prune, recover; whether DVC did record one), the RNG states, the
DVCLive logs that travel with a checkpoint, and the content hash of a pretrained base.

Imports: base, tokenizing, ingest, modeling, distributed.
"""
