"""Fine-tuning on one GPU: a check that every pattern trains end to end, then speed and memory.

    python benchmarks/train.py OUT_FOLDER            (about 5-6 minutes on one H200)

1. ``smoke``: a small random LLaMA (SmolLM2-135M's shape, 4 layers) saved with a small BPE
   tokenizer; ``scca_eval.finetune`` for 4 steps at ctx 2048 in bfloat16 under every preset
   (the GPU's attention backends under autograd, autocast, checkpoints); each adapter then
   loaded as ``ppl --adapter`` loads it, and its logits compared with peft's own
   ``PeftModel.from_pretrained`` on a base given ``trainable_params.bin`` (LongLoRA's merge
   script's order). Writes ``smoke.json``.
2. ``bench``: ``scca-eval bench train`` at ctx 8192 and 32768 on the LLaMA-2-7B shape
   (random weights, bf16), the baseline loop and the finetune step under full and every
   preset, activations offloaded to host memory (``--offload-activations on``). Writes ``train.json``
   and ``train.md``.
3. ``kept``: the finetune step under full attention at both lengths with the activations
   kept on the GPU (``--no-offload-activations``). Writes ``train_no_offload.json``.
4. ``compiled``: ctx 8192, full attention, decoder layers compiled, when the time left
   allows. Writes ``train_compiled.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PATTERNS = ("full", "s2", "scca_fixed", "scca_flow", "sda", "longmixed")
# Without a GPU the script only checks itself: short windows, no 7B benchmark.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CTX = 2048 if DEVICE == "cuda" else 128


def _small_model(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from scca_eval.bench import random_model

    texts = [p.read_text(encoding="utf-8")[:200000] for p in sorted((REPO / "tasks/data/pg19_sample").glob("*.txt"))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    model = random_model("smollm2-135m", device=torch.device("cpu"), dtype=torch.float32, max_ctx=4096, layers=4)
    model.config.bos_token_id, model.config.eos_token_id = 0, 1
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def smoke(out: Path) -> list[dict]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from scca_eval import finetune
    from scca_eval.models import load_model

    base_dir = out / "smoke-base"
    _small_model(base_dir)
    ids = torch.randint(2, 2000, (1, CTX), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    rows = []
    for pattern in PATTERNS:
        row = {"pattern": pattern}
        started = time.perf_counter()
        try:
            record = finetune(str(base_dir), ctx=CTX, out=out / f"smoke-{pattern}", pattern=pattern,
                              data=[str(REPO / "tasks/data/pg19_sample")], steps=4, grad_accum=2, warmup_steps=1,
                              lr=1e-3, save_every=2, dtype="bfloat16", notify=print)
            row.update(loss_curve=record["loss_curve"], tokens_per_second=record["runtime"]["tokens_per_second"],
                       peak_memory=record["runtime"]["peak_memory"])
            ours, _ = load_model(str(base_dir), adapter=str(out / f"smoke-{pattern}"), dtype="bfloat16")
            base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).to(DEVICE)
            base.load_state_dict(torch.load(out / f"smoke-{pattern}" / "trainable_params.bin", weights_only=True),
                                 strict=False)
            theirs = PeftModel.from_pretrained(base, str(out / f"smoke-{pattern}")).eval()
            with torch.no_grad():
                a, b = ours(ids).logits.float(), theirs(ids).logits.float()  # both full attention
            row["max_logit_difference"] = float((a - b).abs().max())
            row["logit_scale"] = float(b.abs().max())
            row["finite"] = bool(all(map(lambda x: x == x, record["loss_curve"])))
            del ours, base, theirs
        except Exception as error:  # report and go on with the next pattern
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
            row["traceback"] = traceback.format_exc()[-3000:]
        row["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        rows.append(row)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "train-bench"))
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SCCA_EVAL_CACHE", str(out / "cache"))
    from scca_eval.bench import write_outputs
    from scca_eval.bench.train import markdown_train, train_bench

    started = time.perf_counter()
    (out / "smoke.json").write_text(json.dumps(smoke(out), indent=2) + "\n")
    print(f"smoke done after {time.perf_counter() - started:.0f} s", flush=True)

    if DEVICE != "cuda":
        print("no GPU: the 7B benchmark is skipped", flush=True)
        return
    result = train_bench("llama2-7b", (8192, 32768), PATTERNS, steps=1, warmup=1, offload_activations=True)
    write_outputs(result, markdown_train(result), str(out / "train.json"), str(out / "train.md"))
    print(f"bench done after {time.perf_counter() - started:.0f} s", flush=True)

    result = train_bench("llama2-7b", (8192, 32768), ("full",), steps=1, warmup=1, baseline=False,
                         offload_activations=False, gradient_checkpointing=True)
    write_outputs(result, markdown_train(result), str(out / "train_no_offload.json"), None)
    print(f"kept done after {time.perf_counter() - started:.0f} s", flush=True)

    if time.perf_counter() - started < 420:
        result = train_bench("llama2-7b", (8192,), ("full",), steps=2, warmup=2, compile=True,
                             offload_activations=True)
        write_outputs(result, markdown_train(result), str(out / "train_compiled.json"), None)
    print(f"all done after {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
