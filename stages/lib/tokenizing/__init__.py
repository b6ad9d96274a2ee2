"""Tokens: loading a tokenizer folder, the encoders (tokenizers' Rust BPE or tiktoken), the records format render writes
and tokenize reads, source mixtures, token files and their meta, and the batches a session cuts from them.

Imports: base.
"""
