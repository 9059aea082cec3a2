"""Helpers shared by the test files: independent references (dense masks and float64
attention written straight from the rules, the plain transformers perplexity loop), tiny
models and inputs, hand-made result records, and a CLI runner."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from fractions import Fraction as F
from pathlib import Path

import pytest
import torch

from scca_eval.patterns import PatternSpec, Rule, preset

# -- patterns and attention --------------------------------------------------------------
# Mixed rates (lcm 6), a non-default shift, a distant cross and a causal head.
CUSTOM = PatternSpec("custom", (
    (F(1, 4), Rule("shifted", shift=3)),
    (F(1, 4), Rule("cross", distance=2)),
    (F(1, 8), Rule("dilated", rate=3, offset=2)),
    (F(1, 8), Rule("dilated", rate=2, offset=1)),
    (F(1, 4), Rule("causal")),
), chunk_size=24)


def spec_named(name: str) -> PatternSpec:
    if name == "custom":
        return CUSTOM
    if name == "sda4":
        return preset("sda", dilation=4)
    return preset(name)


def dense_mask(spec: PatternSpec, n: int, num_heads: int) -> torch.Tensor:
    pos = torch.arange(n)
    chunk = spec.chunk_for(n)
    return torch.stack([rule.allows(pos[:, None], pos[None, :], chunk) for rule in spec.head_rules(n, num_heads)])


def dense_attention(q, k, v, mask, scaling):
    """float64 softmax attention; query head h uses key/value head h // (H // H_kv)."""
    per_kv = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(per_kv, dim=1)
    v = v.double().repeat_interleave(per_kv, dim=1)
    scores = (q.double() @ k.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def random_qkv(batch, heads, kv_heads, n, dim, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, heads, n, dim, generator=gen, device=device, dtype=dtype)
    k = torch.randn(batch, kv_heads, n, dim, generator=gen, device=device, dtype=dtype)
    v = torch.randn(batch, kv_heads, n, dim, generator=gen, device=device, dtype=dtype)
    return q, k, v



# bf16 keeps 8 bits of mantissa: relative error of a bf16 pattern kernel against the float64 reference
BF16_REL_TOL = 1e-2


# -- whole models -------------------------------------------------------------------------
VOCAB = 256


def tiny_llama(heads=4, kv_heads=2, head_dim=16, layers=2, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=heads * head_dim, intermediate_size=96,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=256,
                         # larger random weights than the default 0.02 give sharper
                         # attention, so that a pattern visibly changes the outputs
                         initializer_range=0.1)
    return LlamaForCausalLM(config).eval()


def token_batch(batch=2, n=37, seed=0):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **kwargs).logits



# -- perplexity reference (the transformers perplexity guide's loop) ------------------------
def reference_perplexity(model, tokenizer, texts, ctx, stride, last_window="full"):
    """With last_window="full" (the default protocol) a document's last window is moved back
    to end at the document's end with ctx tokens, its scored targets unchanged."""
    nll_sum, scored = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
        length = ids.shape[1]
        prev_end = 0
        for begin in range(0, length, min(stride, ctx - 1)):
            end = min(begin + ctx, length)
            target_len = end - prev_end
            if end == length and last_window == "full":
                begin = max(0, length - ctx)
            inputs = ids[:, begin:end]
            labels = inputs.clone()
            labels[:, :-target_len] = -100
            with torch.no_grad():
                loss = model(input_ids=inputs, labels=labels).loss
            count = int((labels[:, 1:] != -100).sum())
            nll_sum += float(loss) * count
            scored += count
            prev_end = end
            if end == length:
                break
    return math.exp(nll_sum / scored), scored


def texts_of(folder: Path):
    return [p.read_text(encoding="utf-8") for p in sorted(folder.iterdir())]



# -- result records and the CLI -----------------------------------------------------------
PATTERN_GROUPS = {"full": "1 causal", "s2": "1/2 local + 1/2 shifted", "scca_fixed": "1/2 local + 1/2 cross(1)",
                  "sda": "1/2 dilated(2,0) + 1/2 dilated(2,1)"}


def make_record(model="m", task="pg19_sample", pattern="full", ctx=1024, ppl=10.0, *, stride=None, ci95=None,
                bits_per_byte=None, word_perplexity=None, dilation=None, chunk_size=None):
    """A result record with the given numbers (only the fields tables read are meaningful)."""
    return {
        "schema": 1, "model": model, "task": task, "pattern": pattern, "ctx": ctx, "stride": stride or ctx,
        "metrics": {"perplexity": ppl, "nll_sum": 1.0, "tokens": 100, "bits_per_byte": bits_per_byte,
                    "word_perplexity": word_perplexity, "byte_perplexity": None, "ci95": ci95},
        "documents": [{"id": "d0", "nll_sum": 1.0, "tokens": 100, "bytes": 400, "words": 80}],
        "skipped_documents": [],
        "config": {"protocol": "stride", "last_window": "full",
                   "model": {"id": model, "fingerprint": {"digest": f"sha256:{model}"}},
                   "pattern": {"name": pattern, "groups": PATTERN_GROUPS.get(pattern, pattern),
                               "chunk_size": chunk_size, "chunk_ratio": "1/4", "dilation": dilation},
                   "task": {"name": task}, "data_fingerprint": "data", "tokenizer_fingerprint": "tok",
                   "add_bos": False, "max_tokens": None, "batch_size": 1, "dtype": "float32",
                   "bootstrap_seed": 0, "versions": {}},
        "runtime": {"seconds": 1.0, "tokens_per_second": 100.0, "device": "cpu", "started": "now"},
    }


def run_cli(args, capsys):
    from scca_eval.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module of tiny tensors (use it with autouse in that module)."""
    # these tensors are tiny: a second intra-op thread only adds synchronisation,
    # which costs up to 40x on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- a local lm-evaluation-harness task ----------------------------------------------------
# A local lm-evaluation-harness task over a JSON-lines file: rolling log-likelihood of each
# document's ``text`` with lm-eval's word perplexity, byte perplexity and bits per byte. It
# needs no network: lm-eval reads the file with the datasets ``json`` builder.

TASK_NAME = "scca_local_rolling"

TASK_YAML = f"""task: {TASK_NAME}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {{data}}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def write_local_task(folder: Path, texts: list[str]) -> tuple[Path, Path]:
    """Write ``docs.jsonl`` and a task YAML into ``folder``; returns (task folder, data file)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "docs.jsonl"
    with data.open("w", encoding="utf-8") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"id": f"doc{i}", "text": text}) + "\n")
    (folder / f"{TASK_NAME}.yaml").write_text(TASK_YAML.replace("{data}", str(data)), encoding="utf-8")
    return folder, data


def launch_two_processes(args: list[str], cwd: Path, timeout: int = 300,
                         rank_zero_delay: float = 0.0) -> subprocess.CompletedProcess:
    """``scca-eval ARGS`` as two gloo processes on this machine (what ``--gpus 2`` starts), from
    a fresh interpreter that imports this checkout; returns the finished launcher.
    ``rank_zero_delay``: rank 0 starts that many seconds late (a ``sitecustomize`` put on its
    path), so that the other rank meets any error first."""
    repo = Path(__file__).resolve().parents[1]
    path = str(repo)
    if rank_zero_delay:
        slow = cwd / "rank_zero_starts_late"
        slow.mkdir(exist_ok=True)
        (slow / "sitecustomize.py").write_text(
            f"import os, time\nif os.environ.get('RANK') == '0':\n    time.sleep({rank_zero_delay})\n")
        path = f"{slow}{os.pathsep}{path}"
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    code = f"import sys; from scca_eval.distributed import launch; sys.exit(launch({list(args)!r}, 2))"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)



class CtrlCAtStep:
    """A fine-tune's progress that presses Ctrl-C once, after the given step (the run saves and stops)."""

    def __init__(self, step: int):
        self.at = step

    def begin(self, *args):
        pass

    def end(self):
        pass

    def step(self, result):
        if result["step"] == self.at:
            os.kill(os.getpid(), signal.SIGINT)


def masked_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    """The varlen contract of attention/packed.py as one SDPA call under a block-diagonal mask
    (no host sync, so torch.compile traces it whole)."""
    rows_q, rows_k = torch.arange(len(q)), torch.arange(len(k))
    segment_q = torch.bucketize(rows_q, cu_q[1:].long(), right=True)
    segment_k = torch.bucketize(rows_k, cu_k[1:].long(), right=True)
    mask = segment_q[:, None] == segment_k[None, :]
    if causal:
        mask &= (rows_q - cu_q.long()[segment_q])[:, None] >= (rows_k - cu_k.long()[segment_k])[None, :]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale)
    return out.transpose(0, 1)
