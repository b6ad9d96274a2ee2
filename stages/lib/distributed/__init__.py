"""Several processes: the launcher, the world (ranks and collectives), wrapping a model for DDP or FSDP, and gathering
the full state to rank 0 or spreading it back.

Imports: base, tokenizing, ingest, modeling.
"""
