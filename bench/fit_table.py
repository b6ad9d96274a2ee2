"""Which model fits which GPU: the memory plan (stages/lib/modeling/memory.py) for Llama and Qwen configs of 0.5B to
14B parameters on 15, 16, 24 and 80 GiB, for a full fine-tune, a LoRA and a LoRA on a 4-bit base (QLoRA), at
sequences of 2048 tokens. Prints the markdown table the README shows.

    python bench/fit_table.py

Each cell: the largest micro-batch (of 16, 8, 4, 2, 1) that fits, without activation checkpointing if one fits so,
else with it; a full fine-tune that fits with neither tries 8-bit AdamW. "no" gives the least the plan needs.
Nothing is loaded: the models are built on PyTorch's meta device from the configs below (their config.json values).
"""

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import LlamaConfig, Qwen2Config  # noqa: E402

from stages.lib.modeling.memory import GIB, Setup, model_shape, plan_memory, size  # noqa: E402

MODELS = {  # name -> config, as in each model's config.json
    "Qwen2.5-0.5B": Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                                tie_word_embeddings=True),
    "Qwen2.5-1.5B": Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                                tie_word_embeddings=True),
    "Llama-3.2-3B": LlamaConfig(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                                max_position_embeddings=131072, tie_word_embeddings=True),
    "Qwen2.5-7B": Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                              num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
                              tie_word_embeddings=False),
    "Llama-3.1-8B": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                                tie_word_embeddings=False),
    "Qwen2.5-14B": Qwen2Config(vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                               num_attention_heads=40, num_key_value_heads=8, max_position_embeddings=131072,
                               tie_word_embeddings=False),
}
GPUS = {"T4, 15 GiB": (15, "fp16"), "P100, 16 GiB": (16, "fp16"), "L4, 24 GiB": (24, "bf16"),
        "A100/H100, 80 GiB": (80, "bf16")}
MODES = {"full fine-tune": {}, "LoRA r16": {"lora_r": 16, "lora_dropout": True},
         "QLoRA r16 (nf4)": {"lora_r": 16, "lora_dropout": True, "quantize": "nf4"}}
SEQ_LEN = 2048


def best_fit(shape, gib: int, precision: str, mode: dict) -> str:
    """The cell for one model, GPU and mode."""
    base = Setup(1, SEQ_LEN, precision=precision, **mode)
    tries = [{"activation_checkpointing": False}, {"activation_checkpointing": True}]
    if not mode:
        tries.append({"activation_checkpointing": True, "optimizer": "adamw8bit"})
    for settings in tries:
        for batch in (16, 8, 4, 2, 1):
            plan = plan_memory(shape, replace(base, batch_size=batch, **settings), gib * GIB)
            if plan.fits():
                extras = [name for key, name in (("activation_checkpointing", "checkpointing"),
                                                 ("optimizer", "8-bit AdamW")) if settings.get(key)]
                return f"batch {batch}{''.join(', ' + e for e in extras)}: {size(plan.peak)}"
    least = plan_memory(shape, replace(base, activation_checkpointing=True,
                                       optimizer="adamw8bit" if not mode else "adamw"))
    return f"no (needs {size(least.peak * 1.1)})"


def main() -> None:
    shapes = {name: model_shape(config) for name, config in MODELS.items()}
    for mode_name, mode in MODES.items():
        print(f"\n**{mode_name}**, {SEQ_LEN} tokens per sequence (peak, the plan's 10% headroom not included)\n")
        print("| model | parameters | " + " | ".join(GPUS) + " |")
        print("|---|---|" + "---|" * len(GPUS))
        for name, shape in shapes.items():
            cells = [best_fit(shape, gib, precision, mode) for gib, precision in GPUS.values()]
            print(f"| {name} | {shape.parameters / 1e9:.2f}B | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
