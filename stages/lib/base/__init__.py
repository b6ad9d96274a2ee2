"""The base every other folder stands on: typed params.yaml, errors for people, safe file writes, progress output,
worker pools and device choice.

Imports: no other folder of stages.lib.
"""
