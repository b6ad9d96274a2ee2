"""The model: families and how they are built or loaded (init_from), LoRA adapters, the loss (a chunked head), precision
and the loss scaler, the memory plan, exports in Hugging Face's layout, and inference on an export.

Imports: base, tokenizing, ingest.
"""
