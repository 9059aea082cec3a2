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
    names = [name for name, _ in peft_model.named_parameters()]
    unmatched = [part for part in recipe.trainable if not any(part in name for name in names)]
    if unmatched:  # a name that matches nothing would train less than asked, without a word
        raise UserError(f"--trainable {','.join(unmatched)} matches no weight of {type(model).__name__}: give parts "
                        "of its weight names (e.g. embed,norm), or --trainable none")
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


# Model types whose decoder layers follow LLaMA's pre-norm layout: input_layernorm and
# post_attention_layernorm feed only projections, the final norm only the head. Elsewhere a
# norm may feed a residual sum or a rotary embedding (Gemma's post-norms, Qwen3's q_norm and
# k_norm), where a float32 output is worth keeping, so only the embedding's output is cast.
PRE_NORM_LAYOUTS = ("llama", "mistral", "qwen2", "qwen3")
_PRE_NORMS = ("input_layernorm", "post_attention_layernorm")


class CastOnceHandle:
    """What ``keep_activations_in`` changed, undone by ``remove()`` (as a hook's handle): its
    forward hooks, and each LoRA layer's input casting back to the setting it had. Handles of
    repeated calls are removed in reverse order. Layers compiled while the hooks were on keep
    them in their graphs (dynamo does not guard on module hooks)."""

    def __init__(self, hooks, casting_before):
        self._hooks, self._casting_before = hooks, casting_before

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        for module, before in self._casting_before:
            module.cast_input_dtype_enabled = before


def _cast_once_modules(base) -> list:
    """The modules whose outputs ``keep_activations_in`` casts: the input embedding and, in a
    pre-norm layout, the norms that feed projections."""
    modules = [base.get_input_embeddings()]
    if getattr(base.config, "model_type", None) in PRE_NORM_LAYOUTS:
        modules += [module for name, module in base.named_modules() if name.rsplit(".", 1)[-1] in _PRE_NORMS]
        final_norm = getattr(base.get_decoder(), "norm", None)
        if final_norm is not None:
            modules.append(final_norm)
    # Only trained float32 weights make float32 outputs; frozen ones are already in the dtype.
    return [module for module in modules
            if any(p.requires_grad and p.dtype == torch.float32 for p in module.parameters(recurse=False))]


def keep_activations_in(peft_model, dtype: torch.dtype) -> CastOnceHandle:
    """Hand the trained embedding's and norms' outputs to the next layer in the compute dtype
    ``dtype`` (training under ``torch.autocast``), cast once where they are made rather than
    once per reader. Call it after ``attach_lora``, which marks those weights trained.

    - The trained embedding and norms hold float32 weights, so their outputs are float32, and
      autocast covers only the matrix products: left alone, a float32 embedding output keeps
      the whole residual stream, and every activation gradient checkpointing stores, in float32
      (twice the memory of a model trained in ``dtype``), and each norm's output is cast again
      by every projection that reads it (q, k, v and their LoRA A, gate, up), in the forward,
      its recomputation and the backward. The norms are cast only in LLaMA's pre-norm layout
      (``PRE_NORM_LAYOUTS``), where projections are all that read them.
    - peft casts a LoRA layer's input to its adapter's float32 dtype and autocast casts it
      straight back: peft's own switch (``cast_input_dtype_enabled``, the flag
      ``peft.helpers.disable_input_dtype_casting`` sets for a block) turns that round trip off.

    The values the matrix products see are unchanged (one rounding to ``dtype`` either way); a
    norm's output gradient is summed over its readers in ``dtype`` instead of float32. The casts
    are differentiable, so the embedding and norms still get their gradients.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = peft_model.get_base_model()

    def to_dtype(module, inputs, output):
        return output.to(dtype) if isinstance(output, torch.Tensor) and output.is_floating_point() else output

    hooks = [module.register_forward_hook(to_dtype) for module in _cast_once_modules(base)]
    casting_before = [(module, getattr(module, "cast_input_dtype_enabled", True))
                      for module in base.modules() if isinstance(module, BaseTunerLayer)]
    for module, _ in casting_before:
        module.cast_input_dtype_enabled = False
    return CastOnceHandle(hooks, casting_before)


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
