"""lm-evaluation-harness tasks on a scca-eval model under an attention pattern.

:class:`PatternLM` is lm-eval's own ``HFLM`` (its batching, tokenization and every request
type), handed a model that :func:`scca_eval.load_model` loaded — the embedded default, a
folder, a LoRA adapter, RoPE scaling — with the pattern applied through the same
AttentionInterface registration as ``scca-eval ppl``. Importing this module registers it
in lm-eval's model registry as ``scca-eval``, so ``simple_evaluate(model="scca-eval",
model_args={"model": "default", "pattern": "longmixed"}, ...)`` works as well as
``scca-eval lm-eval``.

Under a sparse pattern:

* every sequence runs alone (batch size 1): lm-eval pads the sequences of a batch to one
  length, and a pattern's chunk size follows the length the layers see, so padding would
  change what each query attends;
* generation (``generate_until``) is refused: a pattern is defined for a whole window
  (its chunk size is a quarter of the window's length), so a token decoded one at a time
  against cached keys has no defined rule. Log-likelihood tasks (rolling perplexity,
  multiple choice) score whole sequences and run under the pattern exactly.
"""

from __future__ import annotations

import sys

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..errors import UserError
from ..models import load_model
from ..validation import resolve_pattern_spec

MODEL_NAME = "scca-eval"


@register_model(MODEL_NAME)
class PatternLM(HFLM):
    """``HFLM`` over a scca-eval model with an attention pattern (see the module docstring).

    model, pattern, adapter, rope_scaling, chunk_size, dilation, attention_backend, dtype,
    device, merge_adapter: as for ``scca-eval ppl``. Every other keyword (``max_length``,
    ``batch_size``, ...) goes to ``HFLM``.
    """

    def __init__(self, model: str = "default", pattern: str = "full", *, adapter: str | None = None,
                 rope_scaling: str | None = None, chunk_size: int | None = None, dilation: int | None = None,
                 attention_backend: str = "auto", dtype: str | None = None, device: str | None = None,
                 merge_adapter: bool = False, batch_size: int | str = 1, **hflm_options):
        spec = resolve_pattern_spec(str(pattern), chunk_size=_optional_int(chunk_size),
                                    dilation=_optional_int(dilation))
        lm, tokenizer = load_model(str(model), pattern=spec, dtype=dtype, device=device, adapter=adapter,
                                   merge_adapter=bool(merge_adapter), rope_scaling=rope_scaling,
                                   chunk_size=_optional_int(chunk_size), dilation=_optional_int(dilation),
                                   attention_backend=attention_backend)
        if not spec.is_full and str(batch_size) != "1":
            print(f"scca-eval: batch size {batch_size} → 1 under pattern {spec.name}: padded batches would "
                  "change the pattern's chunk size", file=sys.stderr)
            batch_size = 1
        super().__init__(pretrained=lm, tokenizer=tokenizer, batch_size=batch_size, **hflm_options)
        self.pattern = spec

    def generate_until(self, requests, disable_tqdm: bool = False):
        if not self.pattern.is_full:
            raise UserError(f"generation under pattern {self.pattern.name} is not supported: patterns are defined "
                            "for whole windows, not for tokens decoded one at a time; run generative tasks "
                            "with --pattern full")
        return super().generate_until(requests, disable_tqdm=disable_tqdm)


def _optional_int(value):
    return None if value in (None, "", "None") else int(value)
