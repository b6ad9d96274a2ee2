"""Several processes: the launcher, the world (ranks and collectives), a failure on one process stopping them all,
wrapping a model for DDP or FSDP, and gathering the full state to rank 0 or spreading it back.

Imports: base, tokenizing, ingest, modeling.
"""
