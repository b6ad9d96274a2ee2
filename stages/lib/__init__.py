"""The library under the stage commands, grouped by job. Each folder imports only the folders before it in this list
(tests/test_layout.py checks it):

base -> tokenizing -> ingest -> modeling -> distributed -> checkpointing -> training -> daily

A package __init__ holds only its docstring: importing a folder loads nothing, so a command that needs no torch
(a spent budget, the daily command) does not pay for it.
"""
