"""Attention alone, per pattern, against SDPA causal attention (issue: Speed).

    python benchmarks/attention.py --n 8192,32768 --variants flex,flex-tma --json out.json --markdown out.md

Backends: flex (the default FlexAttention settings), chunked, strided, auto, and
the FlexAttention variants named below (kernel options and layouts tried while
tuning; each compiles its own kernel).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from scca_eval.attention.flex import (  # noqa: E402
    HOPPER_SMALL_HEAD_BACKWARD_TILE, HOPPER_SMALL_HEAD_TILES)
from scca_eval.bench import attention_bench, markdown_attention, write_outputs  # noqa: E402

VARIANTS = {
    # skips the empty-row guard: wrong (NaN) for dilated rules, timed to see what the guard costs
    "flex-unsafe": {"kernel_options": {"ROWS_GUARANTEED_SAFE": True}},
    "flex-n128": {"kernel_options": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}},
    "flex-m64": {"kernel_options": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}},
    "flex-tma": {"kernel_options": {"USE_TMA": True}},
    "flex-split": {"split_layouts": True},
    "flex-contig": {"contiguous": True},
    "flex-split-tma": {"split_layouts": True, "kernel_options": {"USE_TMA": True}},
    "flex-b64": {"block_size": 64, "kernel_options": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4,
                                                      "num_stages": 3}},
    # Tiles of the forward (fwd_) and backward (bwd_) kernels apart, against Triton's defaults
    # for this GPU (on an H100 at head dim 64: forward 128x128, 3 stages, 4 warps; backward
    # 64x128 / 128x64, 3 stages, 8 warps).
    "flex-fwd-128x64": {"kernel_options": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 3,
                                           "fwd_num_warps": 4}},
    "flex-fwd-128x128w8": {"kernel_options": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_stages": 2,
                                              "fwd_num_warps": 8}},
    "flex-fwd-64x128": {"kernel_options": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 128, "fwd_num_stages": 3,
                                           "fwd_num_warps": 4}},
    "flex-bwd-64x64": {"kernel_options": HOPPER_SMALL_HEAD_BACKWARD_TILE},
    "flex-bwd-32x128": {"kernel_options": {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128,
                                           "bwd_BLOCK_N2": 32, "bwd_num_stages": 3, "bwd_num_warps": 4}},
    "flex-bwd-64x128w4": {"kernel_options": {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128,
                                             "bwd_BLOCK_N2": 64, "bwd_num_stages": 3, "bwd_num_warps": 4}},
    # A variant's kernel_options replace the defaults, so the flex-bwd-* variants above run
    # Triton's forward tile, and flex-fwd-64x128 is flex.py's Hopper default before the backward
    # tile joined it. This one spells out that default (HOPPER_SMALL_HEAD_TILES): timed beside
    # `flex`, the difference between the two is the run's noise.
    "flex-fwd-64x128-bwd-64x64": {"kernel_options": HOPPER_SMALL_HEAD_TILES},
    # FlexAttention's FlashAttention 4 kernels (CuTe DSL) instead of its Triton ones; needs the
    # flash-attn-4 package and its CUTLASS DSL, which this project does not install.
    "flex-flash": {"kernel_options": {"BACKEND": "FLASH"}},
    # Key/value heads repeated per query head instead of the kernel's enable_gqa: more
    # programs in the backward's key/value kernel where there are few key/value heads.
    "flex-repeat-kv": {"repeat_kv": True},
    "flex-repeat-kv-bwd-64x64": {"repeat_kv": True, "kernel_options": HOPPER_SMALL_HEAD_BACKWARD_TILE},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default="8192,32768")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--patterns", default="s2,scca_fixed,scca_flow,sda,sda-r4,longmixed")
    parser.add_argument("--backends", default="flex,chunked,strided")
    parser.add_argument("--variants", default="", help=f"extra FlexAttention variants: {', '.join(VARIANTS)}")
    parser.add_argument("--modes", default="fwd", help="fwd and/or fwd+bwd, comma-separated")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()

    variants = {name: VARIANTS[name] for name in filter(None, args.variants.split(","))}
    backends = [name for name in args.backends.split(",") if name] + list(variants)
    result = attention_bench([int(n) for n in args.n.split(",")], args.heads, args.head_dim,
                             args.patterns.split(","), torch.bfloat16 if torch.cuda.is_available() else torch.float32,
                             kv_heads=args.kv_heads, backends=backends, flex_variants=variants,
                             modes=args.modes.split(","), repeats=args.repeats)
    write_outputs(result, markdown_attention(result), args.json, args.markdown)


if __name__ == "__main__":
    main()
