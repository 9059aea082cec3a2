"""Data parallel `ppl` on several GPUs against one GPU: same record, and the speed-up.

Builds (once) a model folder of the LLaMA-2-7B shape with random bf16 weights and a
32000-token BPE tokenizer trained on the bundled samples, then runs

    scca-eval ppl --model FOLDER --task TASK --ctx CTX -q --out WORK/gpus1
    scca-eval ppl --model FOLDER --task TASK --ctx CTX -q --out WORK/gpusN --gpus N

and compares the two records: per-document NLL sums (how many are bitwise equal, the
largest relative difference), perplexity, and scored tokens/s (scoring time only, model
loading excluded; the record's runtime.tokens_per_second).

Usage (a machine with two GPUs, about 5 minutes):
    python benchmarks/data_parallel.py --gpus 2 --json benchmarks/results/h200x2_data_parallel.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_model_folder(folder: Path, shape, max_ctx: int, device: str = "cuda") -> None:
    """Random weights of ``shape`` (created on the GPU, saved as bf16 safetensors) and a tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from scca_eval.bench.model import random_model

    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    texts = [p.read_text(encoding="utf-8") for p in sorted((REPO / "tasks" / "data").rglob("*"))
             if p.is_file() and p.suffix != ".md"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=32000, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    model = random_model(shape, device=torch.device(device), dtype=torch.bfloat16, max_ctx=max_ctx)
    model.config.bos_token_id, model.config.eos_token_id = 0, 1
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def run_ppl(model: Path, out: Path, task: str, ctx: int, extra: list[str]) -> tuple[dict, float]:
    """``scca-eval ppl`` on ``model`` with ``extra`` options; (its one record, wall seconds with loading)."""
    command = [sys.executable, "-m", "scca_eval", "ppl", "--model", str(model), "--task", task,
               "--ctx", str(ctx), "-q", "--out", str(out), *extra]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    (record_file,) = sorted(out.glob("*.json"))
    return json.loads(record_file.read_text()), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--shape", default="llama2-7b")
    parser.add_argument("--ctx", type=int, default=8192)
    parser.add_argument("--task", default="pg19_sample")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="Where the model folder and records go.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the summary to this file.")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="scca-eval-data-parallel-"))
    model = work / f"{args.shape}-random"
    t0 = time.perf_counter()
    build_model_folder(model, args.shape, args.ctx)
    print(f"model folder ready in {time.perf_counter() - t0:.0f} s", flush=True)

    limit = ["--max-tokens", str(args.max_tokens)] if args.max_tokens else []
    one, wall_one = run_ppl(model, work / "gpus1", args.task, args.ctx, limit)
    many, wall_many = run_ppl(model, work / f"gpus{args.gpus}", args.task, args.ctx,
                              [*limit, "--gpus", str(args.gpus)])

    pairs = list(zip(one["documents"], many["documents"]))
    assert [a["id"] for a, _ in pairs] == [b["id"] for _, b in pairs]
    equal = sum(a["nll_sum"] == b["nll_sum"] for a, b in pairs)
    worst = max(abs(b["nll_sum"] - a["nll_sum"]) / abs(a["nll_sum"]) for a, b in pairs)
    tps_one, tps_many = one["runtime"]["tokens_per_second"], many["runtime"]["tokens_per_second"]
    summary = {
        "shape": args.shape, "ctx": args.ctx, "task": args.task, "gpus": args.gpus,
        "scored_tokens": one["metrics"]["tokens"], "documents": len(pairs),
        "perplexity": {"1": one["metrics"]["perplexity"], str(args.gpus): many["metrics"]["perplexity"]},
        "documents_bitwise_equal": equal, "max_relative_difference": worst,
        "tokens_per_second": {"1": tps_one, str(args.gpus): tps_many},
        "speedup": tps_many / tps_one,
        "scoring_seconds": {"1": one["runtime"]["seconds"], str(args.gpus): many["runtime"]["seconds"]},
        "wall_seconds_with_loading": {"1": round(wall_one, 1), str(args.gpus): round(wall_many, 1)},
        "device": {"1": one["runtime"]["device"], str(args.gpus): many["runtime"]["device"]},
        "deterministic_note": many["runtime"].get("determinism_note"),
    }
    print(json.dumps(summary, indent=2))
    print(f"\n| GPUs | scored tokens/s | speed-up | perplexity |\n| ---: | ---: | ---: | ---: |\n"
          f"| 1 | {tps_one:,.0f} | 1.00 | {one['metrics']['perplexity']:.6f} |\n"
          f"| {args.gpus} | {tps_many:,.0f} | {tps_many / tps_one:.2f} | {many['metrics']['perplexity']:.6f} |\n"
          f"\n{equal} of {len(pairs)} per-document sums bitwise equal; largest relative difference {worst:.2e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
