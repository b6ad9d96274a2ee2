#!/usr/bin/env bash
# The checks that need a GPU, in one run of a few minutes on one card (written for an H100/H200-class GPU; on a
# T4 or V100 the bf16 parts become fp16 ones through train.precision: auto).
#
#     bash bench/gpu_checks.sh [OUTPUT_FOLDER]        # default: gpu-checks/ (or $OUT when it is set)
#     PARTS="sessions" SESSION_STEPS=2 bash bench/gpu_checks.sh /tmp/checks   # some parts, shorter sessions
#
# 1. the train benchmark on the 16M and GPT-2 124M configs in bf16: tokens/s and MFU against the card's data-sheet
#    peak, ours against a plain HuggingFace loop, eager and with train.compile (the bar: 45% MFU at 124M);
# 2. one fp16 session followed by one bf16 session of the same run, and a session with train.devices: auto;
# 3. the memory plan against torch.cuda.max_memory_allocated for the three benchmark sizes, with and without
#    activation checkpointing, in bf16 and fp16;
# 4. LoRA: one LoRA session (r=16) of a ~0.5B model (Qwen2-0.5B's config, random weights saved in bf16) through the
#    train stage, its memory plan next to the torch.cuda.max_memory_allocated it prints after 5 steps; then LoRA
#    against a full fine-tune of the same model: peak memory, step time (interleaved), checkpoint and export sizes;
# 5. QLoRA: one QLoRA session (train.lora.quantize: nf4, r=16) and one LoRA session of a ~1B Llama (Llama-3.2-1B's
#    shape, random weights saved in bf16) through the train stage: tokens/s of each, their memory plans and the
#    peaks they print; then full fine-tune (AdamW, 8-bit AdamW), LoRA and QLoRA side by side on Qwen2-0.5B's config.
# Each part's output is in OUTPUT_FOLDER/<part>.log; a failing part does not stop the others. PARTS (names below:
# bench, sessions, memory, lora, qlora) runs some of them; SESSION_STEPS sets the sessions' steps_today (default 300).
set -u
STEPS=${SESSION_STEPS:-300}
wanted() { [[ -z "${PARTS:-}" || " $PARTS " == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUTPUT=${1:-${OUT:-gpu-checks}}
mkdir -p "$OUTPUT"
OUTPUT=$(cd "$OUTPUT" && pwd)
export DVC_STUDIO_OFFLINE=1 PYTHONUNBUFFERED=1

part() {  # part NAME COMMAND...: run it, keep its output, say how it ended
    local name=$1
    shift
    local began=$SECONDS
    echo "== $name: $*"
    timeout 420 "$@" >"$OUTPUT/$name.log" 2>&1
    local code=$?
    echo "   exit $code after $((SECONDS - began)) s; last lines:"
    tail -n 12 "$OUTPUT/$name.log" | sed 's/^/   | /'
}

nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv >"$OUTPUT/gpu.txt" 2>&1
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))" \
    >>"$OUTPUT/gpu.txt" 2>&1
cat "$OUTPUT/gpu.txt"

# 1. Speed and MFU (bf16 is what train.precision: auto picks on compute capability 8.0 and above).
wanted bench && part train-bench-eager python bench/bench_train.py --configs gpt2-16m,gpt2-124m --rounds 3 --steps 5 \
    --no-startup --device cuda
wanted bench && part train-bench-compiled python bench/bench_train.py --configs gpt2-16m,gpt2-124m --rounds 3 --steps 5 \
    --no-startup --device cuda --compile

# 2. Sessions of one run on the sample data, as a user runs them: fp16 (as on a T4), then bf16, then devices: auto.
set_train() {  # set_train KEY=VALUE...: change params.yaml's train section in the run's copy
    python - "$@" <<'EOF'
import sys, yaml
params = yaml.safe_load(open("params.yaml"))
for item in sys.argv[1:]:
    key, value = item.split("=", 1)
    params["train"][key] = yaml.safe_load(value)
yaml.safe_dump(params, open("params.yaml", "w"), sort_keys=False)
EOF
}
sessions() {
    cd "$1" && git init -q && git add -A && git -c user.email=check@localhost -c user.name=check commit -qm run &&
    python -m stages.render && python -m stages.tokenizer && python -m stages.tokenize &&
    set_train precision=fp16 steps_today="$STEPS" && python -m stages.train && cat checkpoints/step-*/scaler.json &&
    set_train precision=bf16 steps_today="$STEPS" && python -m stages.train &&
    set_train precision=auto steps_today="$STEPS" devices=auto && python -m stages.train &&
    python -m stages.evaluate && cat outputs/eval/metrics.json
}
if wanted sessions; then
    RUN=$(mktemp -d)
    git ls-files -z | xargs -0 -I{} cp --parents {} "$RUN"/
    (sessions "$RUN") >"$OUTPUT/sessions.log" 2>&1
    echo "== sessions: exit $?"
    grep -E "memory plan|peak about|session plan|fp16 loss scaling|resuming from|trains steps|exported|peak GPU" \
        "$OUTPUT/sessions.log" | sed 's/^/   | /'
    cp -r "$RUN/outputs" "$OUTPUT/sessions-outputs" 2>/dev/null
    rm -rf "$RUN"
fi

# 3. The memory plan's estimate against the allocator's peak on the GPU.
wanted memory && part memory-bf16 python bench/bench_memory.py --device cuda --precision bf16 --batch-size 8 --seq-len 1024
wanted memory && part memory-fp16 python bench/bench_memory.py --device cuda --precision fp16 --batch-size 8 --seq-len 1024 \
    --sizes 120m

# 4. LoRA (a frozen 16-bit base with fp32 adapters) on Qwen2-0.5B's config: one session, then against a full fine-tune.
wanted lora && part lora-session python bench/bench_lora.py --size qwen2-0.5b --device cuda --session --steps 20 \
    --batch-size 8 --seq-len 1024
wanted lora && part lora-vs-full python bench/bench_lora.py --size qwen2-0.5b --device cuda --batch-size 8 \
    --seq-len 1024 --rounds 5

# 5. QLoRA (the frozen base in 4 bits through bitsandbytes, fp32 adapters) against LoRA, and the four ways to fit.
wanted qlora && part qlora-vs-lora-sessions python bench/bench_qlora.py --size llama-1b --device cuda --session \
    --steps 20 --batch-size 4 --seq-len 1024 --activation-checkpointing
wanted qlora && part qlora-lora-full python bench/bench_qlora.py --size qwen2-0.5b --device cuda --batch-size 8 \
    --seq-len 1024 --rounds 5

echo "outputs in $OUTPUT"
