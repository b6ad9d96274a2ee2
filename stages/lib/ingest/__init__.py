"""Raw data in: readers for every file shape (JSON, JSONL, Parquet, text, compressed), field and role mapping, cutting
large files into pieces, sources and their weights, chat templates, and converting raw records into rendered records
with counts of what was dropped or looked suspicious.

Imports: base, tokenizing.
"""
