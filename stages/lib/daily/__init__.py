"""The daily command's side of git and DVC: what the workspace holds, what the pipeline writes, params edits for a
session, the sessions log (outputs/sessions.jsonl), and the lease in the git remote that keeps one session at a time
per run across machines.

Imports: every folder below it.
"""
