"""Whole-model evaluation throughput, engine against a plain transformers loop (issues: Speed, GPU speed).

    python benchmarks/model.py --shape llama2-7b --ctx 8192,32768 --patterns full,s2,sda --json out.json
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from scca_eval.bench import markdown_model, model_bench, write_outputs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama2-7b")
    parser.add_argument("--ctx", default="8192,32768")
    parser.add_argument("--patterns", default="full,s2,scca_fixed,scca_flow,sda,longmixed")
    parser.add_argument("--backends", default="auto")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--tokens-per-run", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-plain", action="store_true")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()

    result = model_bench(args.shape, [int(c) for c in args.ctx.split(",")], args.patterns.split(","),
                         args.batch_size, backends=args.backends.split(","), tokens_per_run=args.tokens_per_run,
                         repeats=args.repeats, plain=not args.no_plain, layers=args.layers)
    write_outputs(result, markdown_model(result), args.json, args.markdown)


if __name__ == "__main__":
    main()
