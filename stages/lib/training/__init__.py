"""The run: the decision made once before a session (resume or not, and why), the preflight, the optimizer, the LR
schedule, the loop, the deadline, the session plan and summary, stop requests, and the trainer that puts a session
together.

Imports: every folder below it (base, tokenizing, ingest, modeling, distributed, checkpointing).
"""
