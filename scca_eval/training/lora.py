"""LoRA through peft, plus LongLoRA's fully trained embeddings and norms.

``attach_lora`` wraps the loaded model with ``peft.get_peft_model`` and, as LongLoRA's
``fine-tune.py`` does, sets ``requires_grad`` on every parameter whose name contains one
of the ``trainable`` parts (``embed``, ``norm``). Those weights are saved apart, in
``trainable_params.bin``, under the base model's own keys (``model.embed_tokens.weight``,
…), which is what LongLoRA's merge script loads into the base model before the adapter.
"""

from __future__ import annotations

import torch

from ..errors import MissingDependency, UserError
from ..models.adapters import PEFT_PREFIX, quiet_peft
from .recipe import Recipe


def attach_lora(model, recipe: Recipe, base_model_name: str):
    """The peft model to train; trainable weights in float32 (the optimizer's master copy)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise MissingDependency("peft", None, "Fine-tuning with LoRA") from None

    config = LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                        target_modules=list(recipe.lora_targets), bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(recipe.seed)  # LoRA's A matrices start random: same seed, same start
    try:
        with quiet_peft():
            peft_model = get_peft_model(model, config)
    except ValueError as error:  # "Target modules {...} not found in the base model"
        raise UserError(f"--lora-targets {','.join(recipe.lora_targets)} does not fit {type(model).__name__} "
                        f"({str(error).splitlines()[0][:160]}); name its linear layers, e.g. "
                        "q_proj,k_proj,v_proj,o_proj") from None
    # Named after the model as the user gave it (not a cache folder on this machine).
    peft_model.peft_config["default"].base_model_name_or_path = base_model_name
    for name, parameter in peft_model.named_parameters():
        if any(part in name for part in recipe.trainable):
            parameter.requires_grad_(True)
    for parameter in trainable_parameters(peft_model).values():
        if parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    return peft_model


def trainable_parameters(peft_model) -> dict[str, torch.nn.Parameter]:
    """Every parameter the optimizer updates, by name, in a fixed order."""
    return {name: p for name, p in peft_model.named_parameters() if p.requires_grad}


def fully_trained_state(trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained non-LoRA weights under the base model's keys (``trainable_params.bin``).

    ``trained``: every trained weight by parameter name, whole (``sharding.full_trainable_state``)."""
    state = {}
    for name, tensor in trained.items():
        if "lora_" in name:
            continue
        key = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        state[key] = tensor.detach().to("cpu", copy=True).contiguous()
    return state


class _Handles:
    """Hooks and the LoRA layers' input casting, undone together (``remove()``, as one hook's
    handle): ``casting_before`` holds each layer with the setting it had."""

    def __init__(self, hooks, casting_before):
        self._hooks, self._casting_before = hooks, casting_before

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        for module, before in self._casting_before:
            module.cast_input_dtype_enabled = before


def keep_activations_in(peft_model, dtype: torch.dtype) -> _Handles:
    """Hand every activation to the next layer in the compute dtype ``dtype`` (training under
    ``torch.autocast``), cast once where it is made rather than once per reader.

    - The trained embedding and norms hold float32 weights, so their outputs are float32, and
      autocast adds only the matrix products: left alone, a float32 embedding output keeps the
      whole residual stream, and every activation gradient checkpointing stores, in float32
      (twice the memory of a model trained in ``dtype``), and each norm's output is cast again
      by every projection that reads it (q, k, v and their LoRA A, gate, up), in the forward,
      its recomputation and the backward.
    - peft casts a LoRA layer's input to its adapter's float32 dtype and autocast casts it
      straight back: peft's own switch (``cast_input_dtype_enabled``) turns that round trip off.

    The values the matrix products see are unchanged (one rounding to ``dtype`` either way); a
    norm's output gradient is summed over its readers in ``dtype`` instead of float32. The casts
    are differentiable, so the embedding and norms still get their gradients. Returns a handle
    whose ``remove()`` undoes both.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = peft_model.get_base_model()
    trained_float32 = [module for module in base.modules() if not isinstance(module, torch.nn.Linear)
                       and any(p.requires_grad and p.dtype == torch.float32 for p in module.parameters(recurse=False))]

    def to_dtype(module, inputs, output):
        return output.to(dtype) if isinstance(output, torch.Tensor) and output.is_floating_point() else output

    hooks = [module.register_forward_hook(to_dtype) for module in trained_float32]
    casting_before = [(module, getattr(module, "cast_input_dtype_enabled", True))
                      for module in base.modules() if isinstance(module, BaseTunerLayer)]
    for module, _ in casting_before:
        module.cast_input_dtype_enabled = False
    return _Handles(hooks, casting_before)


def enable_gradient_checkpointing(peft_model) -> None:
    """transformers' own gradient checkpointing (non-reentrant: no input grads needed)."""
    base = peft_model.get_base_model()
    base.config.use_cache = False
    options = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # the newer name (transformers >= 5.2x)
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def compile_layers(model, cuda_graphs: bool = False) -> None:
    """Compile each decoder layer of ``model`` (a peft model or a plain one) in place: fused
    elementwise kernels around the matmuls. Each pattern a process trains under is a graph of
    its own (and validation one more), so dynamo's recompile limit is raised: past it, layers
    would run eagerly without a word.

    cuda_graphs: compile with ``mode="reduce-overhead"``, so that each layer's kernels replay
    as one CUDA graph (the host launches one graph instead of every kernel); the trainer then
    marks where each step begins (``torch.compiler.cudagraph_mark_step_begin``)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 64))
    if hasattr(config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        # Newer transformers route a layer's modules through the `kernels` hub, which sets a
        # context variable in every forward and resets it before returning. Inside a checkpointed
        # layer dynamo refuses that side effect, and the whole layer would run eagerly without a
        # word; the recomputation in the backward pass has no need to replay it.
        config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.get_decoder().layers:
        layer.compile(dynamic=False, mode="reduce-overhead" if cuda_graphs else None)


def has_compiled_layers(model) -> bool:
    """Whether any module of ``model`` was compiled in place (``module.compile()``)."""
    return any(getattr(module, "_compiled_call_impl", None) is not None for module in model.modules())
