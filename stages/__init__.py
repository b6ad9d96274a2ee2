"""Pipeline stages: `stages/<name>.py` is one DVC stage or command (`python -m stages.<name>`); `stages/lib/` holds
the parts they share."""
