"""The export users load (docs/formats.md, "Exported model"): the model in HuggingFace layout with its tokenizer,
and for a LoRA run (stages/lib/modeling/lora.py) its adapter in PEFT's layout, as `train.export` says:
- `merged`: the model, its adapters (if any) folded into its weights;
- `adapter`: the adapter alone (adapter_config.json, adapter_model.safetensors) with the tokenizer, which
  `AutoModelForCausalLM.from_pretrained` (with peft installed) and `PeftModel.from_pretrained` load on the base;
- `both`: the merged model, and the adapter in its `adapter/` folder.
"""

import shutil
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from stages.lib.base.files import replaced_folder
from stages.lib.ingest.chat_templates import stop_token_ids
from stages.lib.modeling import lora
from stages.lib.modeling.model_folders import ADAPTER_DIR


def export_model(model: PreTrainedModel, tokenizer_dir: Path, out_dir: Path, trust_remote_code: bool = False,
                 export: str = "merged", base_model: str = "") -> None:
    """Write the export (see the module docstring), complete or absent; same weights give the same bytes.

    `trust_remote_code`: the tokenizer needs code from its folder to load (tokenizer.trust_remote_code).
    `export` and `base_model` (the base's path, train.init_from) for a model with LoRA adapters, which a merged
    export folds into it in place.
    """
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=trust_remote_code)
    with replaced_folder(out_dir) as folder:
        if export != "merged":
            lora.save_adapter(model, folder / ADAPTER_DIR if export == "both" else folder, base_model)
        if export != "adapter":
            _save_model(lora.merge_adapters(model), tokenizer, folder)
        for f in sorted(Path(tokenizer_dir).iterdir()):
            if f.is_file():
                shutil.copyfile(f, folder / f.name)


def _save_model(model: PreTrainedModel, tokenizer, folder: Path) -> None:
    # The exported model is for generating: with the KV cache (training runs without it), and stopping at the end
    # of an assistant turn as well as at EOS, so `pipeline("text-generation")` ends a chat answer where it should.
    gen = model.generation_config
    training_setting = model.config.use_cache, gen.use_cache, gen.eos_token_id
    model.config.use_cache = gen.use_cache = True
    stops = stop_token_ids(tokenizer, model)
    gen.eos_token_id = stops if len(stops) > 1 else stops[0]
    try:
        model.save_pretrained(folder)
    finally:
        model.config.use_cache, gen.use_cache, gen.eos_token_id = training_setting
