"""Fine-tuning with compiled layers (finetune --compile): the trainer's first pass runs
eagerly, so that attention layouts are built before anything is traced
(training/loop.py); which modules count as compiled (training/lora.py)."""

from __future__ import annotations

import numpy as np
import torch

from helpers import tiny_llama
from scca_eval.training.lora import attach_lora, has_compiled_layers
from scca_eval.training.loop import Trainer
from scca_eval.training.recipe import Recipe
from scca_eval.training.windows import TrainingStream


def _trainer(compiled: bool, ctx: int = 32):
    model = tiny_llama()
    recipe = Recipe(ctx=ctx, batch_size=1, grad_accum=2, warmup_steps=0)
    peft_model = attach_lora(model, recipe, "tiny")
    if compiled:
        for layer in peft_model.get_base_model().get_decoder().layers:
            layer.compile(dynamic=False)  # lazy: nothing is compiled before a call
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, ctx * 8).astype(np.int64)
    return Trainer(peft_model, TrainingStream(tokens, ctx, None, [], "random"), recipe, torch.device("cpu"), None)


def test_compiled_layers_are_recognised():
    model = tiny_llama()
    assert not has_compiled_layers(model)
    model.model.layers[1].compile()
    assert has_compiled_layers(model)


def test_the_first_pass_of_compiled_layers_runs_eagerly(monkeypatch):
    stances = []
    real = torch.compiler.set_stance

    def recording(stance, *args, **kwargs):
        stances.append(stance)
        return real(stance, *args, **kwargs)

    monkeypatch.setattr(torch.compiler, "set_stance", recording)
    trainer = _trainer(compiled=True)
    # the test runs every step eagerly (outside, not through the trainer) so that nothing compiles
    with real("force_eager"):
        trainer.step()
        assert stances == ["force_eager"]  # the first of the step's two passes, only
        trainer.step()
    assert stances == ["force_eager"]

    stances.clear()
    _trainer(compiled=False).step()
    assert stances == []  # nothing compiled: no stance is set
