"""The base every other folder stands on: typed params.yaml, errors for people, safe file writes, progress output,
worker pools, device choice, and the project's top folder (where recovery state lives).

Imports: no other folder of stages.lib.
"""
