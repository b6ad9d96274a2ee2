"""The export users load: the model in HuggingFace layout with its tokenizer (docs/formats.md, "Exported model")."""

import shutil
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from stages.lib.files import replaced_folder
from stages.lib.templates import stop_token_ids


def export_model(model: PreTrainedModel, tokenizer_dir: Path, out_dir: Path, trust_remote_code: bool = False) -> None:
    """Write the model in HuggingFace layout with the tokenizer files, complete or absent; same weights give the
    same bytes. `trust_remote_code`: the tokenizer needs code from its folder to load (tokenizer.trust_remote_code)."""
    hf_logging.disable_progress_bar()
    # The exported model is for generating: with the KV cache (training runs without it), and stopping at the end
    # of an assistant turn as well as at EOS, so `pipeline("text-generation")` ends a chat answer where it should.
    gen = model.generation_config
    training_setting = model.config.use_cache, gen.use_cache, gen.eos_token_id
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=trust_remote_code)
    with replaced_folder(out_dir) as folder:
        model.config.use_cache = gen.use_cache = True
        stops = stop_token_ids(tokenizer, model)
        gen.eos_token_id = stops if len(stops) > 1 else stops[0]
        try:
            model.save_pretrained(folder)
        finally:
            model.config.use_cache, gen.use_cache, gen.eos_token_id = training_setting
        for f in sorted(Path(tokenizer_dir).iterdir()):
            if f.is_file():
                shutil.copyfile(f, folder / f.name)
