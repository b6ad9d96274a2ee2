"""The daily command's side of git and DVC: what the workspace holds, what the pipeline writes, params edits for a
session, and the sessions log (outputs/sessions.jsonl).

Imports: every folder below it.
"""
