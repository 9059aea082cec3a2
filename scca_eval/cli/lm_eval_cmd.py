"""`scca-eval lm-eval`: run lm-evaluation-harness tasks on a model under a pattern."""

from __future__ import annotations

import importlib.util
import json
import re
import sys

import click

from ..errors import MissingDependency, UserError
from .options import (adapter_options, device_option, dtype_option, model_option, pattern_option,
                      pattern_settings_options, rope_scaling_options)


@click.command("lm-eval", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@model_option()
@pattern_option(several=False)
@pattern_settings_options(chunk_default="a quarter of each sequence's length")
@adapter_options
@rope_scaling_options(original_ctx=False)
@dtype_option()
@device_option()
@click.option("--max-length", type=int, default=None,
              help="lm-eval's max_length: the longest sequence fed, and the window of rolling "
                   "log-likelihood tasks (the --ctx of `scca-eval ppl --protocol lm-eval`). "
                   "Default: lm-eval's choice from the model's config.")
@click.argument("lm_eval_args", nargs=-1, type=click.UNPROCESSED)
def lm_eval(model, pattern, chunk_size, dilation, attention_backend, adapter, merge_adapter, rope_scaling,
            dtype, device, max_length, lm_eval_args):
    """Run lm-evaluation-harness on a model under an attention pattern.

    Everything after `--` goes to lm-eval's `run` command (--tasks, --num_fewshot,
    --limit, --output_path, --include_path, --model_args for its HF model class ...);
    the model is scca-eval's, loaded and patterned as by `scca-eval ppl`, inside
    lm-eval's own HF model class. Under a sparse pattern every sequence runs alone
    (batch size 1) and generative tasks are refused: a pattern is defined for whole
    windows, not for tokens decoded one at a time.

    \b
    Examples:
      scca-eval lm-eval --pattern longmixed --max-length 2048 -- --tasks wikitext
      scca-eval lm-eval --model ./llama-2-7b --adapter ./longlora-8k --rope-scaling longlora:8192 \\
          --pattern s2 --max-length 8192 -- --tasks my_task --include_path ./my_tasks --batch_size 1
    """
    from ..validation import resolve_pattern_spec

    if importlib.util.find_spec("lm_eval") is None:
        raise MissingDependency("lm-eval", "lm-eval", "scca-eval lm-eval")
    resolve_pattern_spec(pattern, chunk_size=chunk_size, dilation=dilation)  # a bad pattern fails before loading
    passed = list(lm_eval_args)
    if passed and passed[0] == "run":
        passed = passed[1:]
    for name in ("--model", "--device"):
        if any(arg == name or arg.startswith(name + "=") for arg in passed):
            raise UserError(f"give {name} as scca-eval's option before `--`, not as lm-eval's after it")
    if not any(arg in ("--tasks", "-t") or arg.startswith("--tasks=") for arg in passed):
        raise UserError("no lm-eval tasks: add `-- --tasks NAME` (see `lm-eval ls tasks`)")
    if max_length is not None and max_length < 1:
        raise UserError(f"--max-length must be at least 1 (got {max_length})")
    options = {"model": model, "pattern": pattern, "chunk_size": chunk_size, "dilation": dilation,
               "attention_backend": attention_backend, "adapter": adapter, "merge_adapter": merge_adapter,
               "rope_scaling": rope_scaling, "dtype": dtype, "max_length": max_length}
    model_args = json.dumps({key: value for key, value in options.items() if value not in (None, False)})

    from lm_eval.__main__ import cli_evaluate

    from ..evaluation.lm_eval_adapter import MODEL_NAME  # registers the model class with lm-eval

    from ..models import parse_device

    saved = sys.argv
    # lm-eval hands its own --device to the model class, so the device travels that way; its
    # default is cuda:0 even without a GPU, so ours (CUDA when there is one) is always given
    device_args = ["--device", str(parse_device(device))]
    sys.argv = ["lm-eval", "run", "--model", MODEL_NAME, "--model_args", model_args, *device_args, *passed]
    try:
        cli_evaluate()
    except Exception as error:  # noqa: BLE001 - only unknown tasks and a network failure become one line
        missing = _missing_tasks(error)
        if missing is not None:
            raise UserError(f"lm-eval has no task {missing}: check the name (`lm-eval ls tasks`), or give the "
                            "folder of a local task YAML with `-- --include_path DIR`") from None
        unreachable = _unreachable(error)
        if unreachable is None:
            raise
        raise UserError(
            f"lm-eval could not reach {unreachable} (no network?); run lm-eval offline with a local task "
            "(`-- --tasks NAME --include_path DIR`, a task YAML whose dataset reads local files) or a data set "
            "already in the Hugging Face cache (set HF_DATASETS_OFFLINE=1)") from None
    finally:
        sys.argv = saved


def _missing_tasks(error: BaseException) -> str | None:
    """The task names of lm-eval's ValueError "Tasks not found: a, b", or None for any other error."""
    found = re.match(r"Tasks not found: ([^\n]*?)(\. |\.?$|\n)", str(error)) if isinstance(error, ValueError) else None
    return found.group(1) if found else None


# What the hub and data set libraries raise when the network is missing, by class name (they
# come from requests, httpx, huggingface_hub and datasets, none of which this module imports).
_NETWORK_ERRORS = ("ConnectionError", "ConnectError", "ConnectTimeout", "OfflineModeIsEnabled",
                   "LocalEntryNotFoundError", "NameResolutionError", "MaxRetryError")


def _unreachable(error: BaseException) -> str | None:
    """What could not be reached (a repository name where the message gives one), or None when
    ``error`` and its causes are no network failure."""
    seen = error
    while seen is not None:
        if any(type(seen).__name__ == name or isinstance(seen, ConnectionError) for name in _NETWORK_ERRORS):
            quoted = re.search(r"'([\w.-]+/[\w.-]+)'", str(error)) or re.search(r"'([\w.-]+/[\w.-]+)'", str(seen))
            return f"'{quoted.group(1)}'" if quoted else "the Hugging Face hub"
        seen = seen.__cause__ or seen.__context__
    return None
