"""Passkey retrieval: can the model use a fact far back in its window?

LongLoRA's protocol (``passkey_retrivial.py``): a task description, repeated filler text
with one line hiding a random number, then the question; the answer is right when greedy
decoding produces exactly the key's tokens. Here each prompt is exactly ``ctx`` tokens
long with the key's tokens at its end, because a pattern's chunks are cut from the length
the layers see: the model under a pattern sees one full window, as in ``ppl``.

Greedy decoding of the A key tokens is right exactly when, for every i, the most likely
token after the prompt and the first i key tokens is key token i. So one teacher-forced
forward pass over prompt + key decides a trial (no incremental decoding, no KV cache):
the argmax at each answer position must be the next key token. ``tests/evaluation/test_passkey.py``
checks this against transformers' ``generate``.

Differences from LongLoRA's script, each for the reason given:
- the key has five digits (10000–99999; LongLoRA draws 1–50000), so every key has the
  same number of characters;
- the depth (the share of the filler before the key line) is drawn uniformly inside each
  of ``depths`` equal buckets, ``trials`` times per bucket, so accuracy can be read per
  depth; LongLoRA draws it over the whole filler;
- the filler is cut in tokens, not characters, so that the prompt has exactly ctx tokens.

Trials depend only on (seed, ctx, depths, bucket, trial number) and the tokenizer, so every
pattern and every model with the same tokenizer answers the same prompts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Sequence

import numpy as np
import torch

from .. import records
from ..choices import PASSKEY_DEPTHS, PASSKEY_TRIALS
from ..errors import UserError
# A stored record with the same identity (``records.passkey_identity``) answers a cell, so a
# stopped run, run again, continues with the next cell.
from ..records import config_key

TASK = "passkey"
DESCRIPTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
               "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
KEY_RANGE = (10000, 100000)  # five digits
DEFAULT_TRIALS, DEFAULT_DEPTHS = PASSKEY_TRIALS, PASSKEY_DEPTHS


def information_line(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


@dataclass(frozen=True)
class Trial:
    """One prompt: ``ids`` (ctx tokens) end with the key's tokens, from ``answer_start`` on."""

    ctx: int
    bucket: int
    number: int
    key: str
    depth: float          # share of the filler tokens that comes before the key line
    key_position: int     # token index where the key line starts
    answer_start: int
    ids: np.ndarray

    @property
    def answer(self) -> np.ndarray:
        return self.ids[self.answer_start:]


@dataclass(frozen=True)
class Verdict:
    trial: Trial
    predicted: np.ndarray  # argmax token at each answer position
    correct: bool
    key_nll: float         # -log p(key tokens | prompt), teacher-forced


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class PromptBuilder:
    """Builds the trials of one tokenizer. Pieces are tokenized once and joined as token ids,
    so that the filler can be cut to the exact length a ctx needs."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        encode = self._encode
        self.head = encode(DESCRIPTION + "\n")
        # The tokenizer's own habit decides whether a BOS token starts the prompt, as
        # tokenizer(prompt) does in LongLoRA's script.
        with_special = tokenizer("a").input_ids
        bare = encode("a")
        if len(with_special) > len(bare) and with_special[-len(bare):] == bare:
            self.head = list(with_special[: len(with_special) - len(bare)]) + self.head
        self._filler: list[int] = []

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def filler(self, count: int) -> list[int]:
        """The first ``count`` tokens of the repeated filler (cut mid-sentence, as LongLoRA cuts)."""
        repeats = 8
        while len(self._filler) < count:
            repeats *= 2
            self._filler = self._encode(" ".join([FILLER] * repeats))
        return self._filler[:count]

    def pieces(self, key: str) -> tuple[list[int], list[int], list[int]]:
        """(key line, question, answer) token ids for ``key``. The answer is what follows
        the question when question and key are tokenized together."""
        line = self._encode("\n" + information_line(key) + "\n")
        question = self._encode("\n" + QUESTION)
        joint = self._encode("\n" + QUESTION + " " + key)
        split = _common_prefix(question, joint)
        return line, joint[:split], joint[split:]

    def minimum_ctx(self, depths: int) -> int:
        """The shortest ctx that fits the prompt with at least one filler token per bucket."""
        line, question, answer = self.pieces(str(KEY_RANGE[1] - 1))
        return len(self.head) + len(line) + len(question) + len(answer) + depths

    def build(self, ctx: int, key: str, depth: float, bucket: int = 0, number: int = 0) -> Trial:
        line, question, answer = self.pieces(key)
        if not answer:
            raise UserError(f"the tokenizer joins the key {key} into the question's last token; "
                            "passkey retrieval cannot score this tokenizer")
        n_filler = ctx - len(self.head) - len(line) - len(question) - len(answer)
        if n_filler < 1:
            raise UserError(f"--ctx {ctx} is too short for the passkey prompt; give at least "
                            f"{ctx - n_filler + 1} tokens")
        before = min(n_filler, int(round(depth * n_filler)))
        ids = self.head + self.filler(before) + line + self.filler(n_filler - before) + question + answer
        return Trial(ctx=ctx, bucket=bucket, number=number, key=key, depth=before / n_filler,
                     key_position=len(self.head) + before, answer_start=ctx - len(answer),
                     ids=np.asarray(ids, dtype=np.int64))


def make_trials(builder: PromptBuilder, ctx: int, *, trials: int, depths: int, seed: int) -> list[Trial]:
    """``trials`` prompts in each of ``depths`` equal depth buckets; bucket b draws depths in
    [b/depths, (b+1)/depths). Each trial has its own generator, seeded by
    (seed, ctx, depths, bucket, trial), so adding trials keeps the earlier ones."""
    if builder.minimum_ctx(depths) > ctx:
        raise UserError(f"--ctx {ctx} is too short for the passkey prompt with {depths} depth buckets; "
                        f"give at least {builder.minimum_ctx(depths)} tokens")
    out = []
    for bucket in range(depths):
        for number in range(trials):
            rng = np.random.default_rng([seed, ctx, depths, bucket, number])
            key = str(int(rng.integers(*KEY_RANGE)))
            depth = (bucket + rng.random()) / depths
            out.append(builder.build(ctx, key, depth, bucket, number))
    return out


@torch.inference_mode()
def score_trials(model: torch.nn.Module, trials: Sequence[Trial], *, batch_size: int = 1,
                 progress: Callable[[int], None] | None = None) -> list[Verdict]:
    """Teacher-forced greedy verdicts, ``batch_size`` equal-length prompts per forward pass.
    Only the logits of the answer positions are computed (``logits_to_keep``)."""
    device = next(model.parameters()).device
    order = sorted(range(len(trials)), key=lambda i: len(trials[i].ids))
    by_index: dict[int, Verdict] = {}
    start = 0
    while start < len(order):
        length = len(trials[order[start]].ids)
        batch = [i for i in order[start:start + batch_size] if len(trials[i].ids) == length]
        start += len(batch)
        keep = max(len(trials[i].answer) for i in batch) + 1
        input_ids = torch.from_numpy(np.stack([trials[i].ids for i in batch])).to(device)
        logits = model(input_ids=input_ids, use_cache=False, logits_to_keep=keep).logits.float()
        for row, i in enumerate(batch):
            trial = trials[i]
            n = len(trial.answer)
            # Position p predicts token p + 1: the answer's logits are the n before the last.
            row_logits = logits[row, keep - 1 - n: keep - 1]
            target = torch.from_numpy(trial.answer).to(row_logits.device)
            predicted = row_logits.argmax(-1)
            nll = torch.nn.functional.cross_entropy(row_logits, target, reduction="sum")
            by_index[i] = Verdict(trial, predicted.cpu().numpy(), bool((predicted == target).all()), float(nll))
        if progress is not None:
            progress(len(batch))
    return [by_index[i] for i in range(len(trials))]


# ---------------------------------------------------------------- records

def bucket_bounds(bucket: int, depths: int) -> tuple[float, float]:
    return bucket / depths, (bucket + 1) / depths


def summarize(verdicts: Sequence[Verdict], depths: int) -> dict:
    """Accuracy overall and per depth bucket, and the mean NLL of the key."""
    by_depth = []
    for bucket in range(depths):
        members = [v for v in verdicts if v.trial.bucket == bucket]
        low, high = bucket_bounds(bucket, depths)
        correct = sum(v.correct for v in members)
        by_depth.append({"bucket": bucket, "depth_from": low, "depth_to": high, "correct": correct,
                         "trials": len(members), "accuracy": correct / len(members) if members else None})
    correct = sum(v.correct for v in verdicts)
    return {
        "accuracy": correct / len(verdicts) if verdicts else None,
        "correct": correct,
        "trials": len(verdicts),
        "by_depth": by_depth,
        "mean_key_nll": float(np.mean([v.key_nll for v in verdicts])) if verdicts else None,
    }


def trial_entries(verdicts: Sequence[Verdict], tokenizer) -> list[dict]:
    return [{
        "id": f"depth{v.trial.bucket}-trial{v.trial.number}",
        "bucket": v.trial.bucket,
        "depth": round(v.trial.depth, 6),
        "key_position": v.trial.key_position,
        "key": v.trial.key,
        "predicted": tokenizer.decode(v.predicted.tolist()),
        "correct": v.correct,
        "key_nll": v.key_nll,
    } for v in verdicts]


def cell_config(lm, tokenizer, spec, *, trials: int, depths: int, seed: int) -> dict:
    """The settings a passkey record stores (those of ``config_key`` among them)."""
    return records.passkey_config(lm, tokenizer, spec, {
        "trials_per_depth": trials, "depths": depths, "seed": seed, "key_digits": len(str(KEY_RANGE[0])),
        "filler": FILLER, "question": QUESTION, "scoring": "teacher-forced greedy exact match"})


def evaluate_passkey(lm, tokenizer, model_id: str, spec, ctx: int, *, trials: int, depths: int, seed: int,
                     batch_size: int | None = None, progress=None) -> dict:
    """Run the trials of one (pattern, ctx) cell on a loaded model with ``spec`` applied;
    return its record."""
    from .engine import auto_batch_size, is_compiled, model_device

    builder = PromptBuilder(tokenizer)
    cell_trials = make_trials(builder, ctx, trials=trials, depths=depths, seed=seed)
    device = model_device(lm)
    batch = batch_size or auto_batch_size(ctx, device)
    label = f"ctx {ctx} · {records.record_pattern_name(spec)} · {TASK}"
    if progress is not None:
        progress.begin(label, len(cell_trials) * ctx)
    began_at = datetime.now(timezone.utc)
    started = time.perf_counter()
    try:
        verdicts = score_trials(lm, cell_trials, batch_size=batch,
                                progress=(lambda n: progress.advance(n * ctx)) if progress is not None else None)
    finally:
        if progress is not None:
            progress.end()
    seconds = time.perf_counter() - started
    return records.passkey_record(
        model_id, spec, ctx, metrics=summarize(verdicts, depths), trials=trial_entries(verdicts, tokenizer),
        config={**cell_config(lm, tokenizer, spec, trials=trials, depths=depths, seed=seed), "batch_size": batch},
        runtime=records.runtime(lm, seconds=seconds, device_text=records.device_name(device), processes=1,
                                started=began_at, compiled=is_compiled(lm),
                                tokens_per_second=round(len(cell_trials) * ctx / seconds, 1) if seconds > 0 else None))


def run_passkey(loaded, model_id: str, specs: Sequence, ctxs: Sequence[int], *, trials: int = DEFAULT_TRIALS,
                depths: int = DEFAULT_DEPTHS, seed: int = 0, batch_size: int | None = None,
                attention_backend: str = "auto", allow_long_context: bool = False, out=None, progress=None,
                log: Callable[[str], None] | None = None) -> list[dict]:
    """Every (pattern, ctx) cell on a loaded (model, tokenizer); one record per cell, written
    to ``out`` as soon as it is done. A cell whose record ``out`` already holds with the same
    settings (:func:`config_key`) is read instead of run."""
    from ..attention.register import apply_pattern
    from ..validation import check_trained_length

    lm, tokenizer = loaded
    say = log or (lambda message: None)
    builder = PromptBuilder(tokenizer)
    for ctx in ctxs:  # every ctx is checked before the first cell runs
        if builder.minimum_ctx(depths) > ctx:
            raise UserError(f"--ctx {ctx} is too short for the passkey prompt with {depths} depth buckets; "
                            f"give at least {builder.minimum_ctx(depths)} tokens")
    check_trained_length(lm, ctxs, allow_long_context, say)
    existing = records.existing_records(out, say, passkey=True) if out is not None else {}
    done = []
    for spec in specs:
        apply_pattern(lm, spec, backend=attention_backend)
        for ctx in ctxs:
            planned = config_key({"model": model_id, "ctx": ctx,
                                  "config": cell_config(lm, tokenizer, spec, trials=trials, depths=depths, seed=seed)})
            if planned in existing:
                record = existing[planned]
                say(f"have  {record['pattern']} · ctx {ctx} ({record.get('path')})")
            else:
                record = evaluate_passkey(lm, tokenizer, model_id, spec, ctx, trials=trials, depths=depths,
                                          seed=seed, batch_size=batch_size, progress=progress)
                if out is not None:
                    try:
                        path = records.write_record(record, out, say)
                    except UserError as error:
                        # The cell's trials are lost with its record: at least say what they scored.
                        raise UserError(f"{error} (not saved: {record['pattern']} · ctx {ctx} scored accuracy "
                                        f"{record['metrics']['accuracy']:.0%}; the records written before are "
                                        "kept, and a rerun skips them)") from None
                    record["path"] = str(path)
                    say(f"wrote {record['pattern']} · ctx {ctx}: accuracy {record['metrics']['accuracy']:.0%} "
                        f"({path})")
            done.append(record)
    return done
