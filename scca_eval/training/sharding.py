"""Sharded fine-tuning (``finetune --shard``): the model split over the processes with FSDP2.

Replicated data parallelism keeps the whole model on every GPU, so a model larger than one
GPU (LLaMA-2-70B in bfloat16 is about 129 GiB) cannot train that way. With ``--shard`` each
of the N processes keeps 1/N of every weight — the frozen base weights, the LoRA matrices,
the trained embeddings and norms — and of their gradients and AdamW moments, through
PyTorch's own FSDP2 (``torch.distributed.fsdp.fully_shard``):

* **Units**: every decoder layer is one unit (its frozen weights, its
  LoRA matrices and its norms, gathered in one collective before the layer runs, freed
  after it), and the root — :class:`~.loop.WindowLoss`, the module whose forward runs the
  whole training pass — holds what is left: the embedding, the final norm and the LM head.
  The split is torchtune's for its LoRA recipe (layers, then the root).
* **Precision**: FSDP's default policy, no casts of its own. Each weight is gathered in the
  dtype it is kept in (bfloat16 frozen weights, float32 trained ones) and the forward pass
  runs under the same ``torch.autocast`` as one process, so every matrix product sees the
  operands it would see there. Gradients exist for the trained weights only and are
  summed in float32 (FSDP's reduce-scatter, with the divide factor set to 1 because the
  loss of each pass is already divided by the step's target count).
* **Loading**: rank 0 loads the checkpoint into host memory and puts LoRA on it exactly as
  one process does (same seed, same initial matrices); the other ranks build the same
  model on the meta device (no memory). Every rank shards the empty model, allocates only
  its shards on its device, and receives them from rank 0, one tensor at a time
  (``set_model_state_dict(..., broadcast_from_rank0=True)``). So the model exists whole
  once, in rank 0's host memory, and never on a GPU.
* **Saving**: ``full_trainable_state`` and ``full_optimizer_state`` gather the trained
  weights and AdamW's state into whole tensors on rank 0
  (``torch.distributed.checkpoint.state_dict``), so ``checkpoint.pt``,
  ``trainable_params.bin`` and the adapter are the files a one-process run writes; a
  checkpoint resumes sharded or not.

The passes of a step are shared as in replicated data parallelism (pass ``i`` on rank
``i mod N``), so a sharded run trains the weights of a one-process run within float
tolerance (the gradients of the passes are summed in another order).
"""

from __future__ import annotations

import torch

from .lora import trainable_parameters
from .loop import WindowLoss


def decoder_layers(peft_model) -> list[torch.nn.Module]:
    """The decoder layers of the model under the peft wrapper."""
    return list(peft_model.get_base_model().get_decoder().layers)


def is_sharded(peft_model) -> bool:
    """True when the model's weights are FSDP shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in peft_model.parameters())


def shard_for_training(peft_model, device: torch.device, world_size: int, is_main: bool,
                       loss_chunk: int) -> WindowLoss:
    """Shard ``peft_model`` over the process group and fill it with rank 0's weights.

    On rank 0 ``peft_model`` holds the loaded weights (in host memory); on every other rank
    it is the same model on the meta device. Returns the sharded root, whose forward is
    the training pass. Every rank must call this.
    """
    # Rank 0's weights, kept aside (references, no copy) while the model is emptied.
    weights = peft_model.state_dict() if is_main else {}
    buffers = {name: b.detach().clone() for name, b in peft_model.named_buffers()} if is_main else {}
    _to_meta_keeping_shared_weights(peft_model)
    root = shard_empty(peft_model, device, world_size, loss_chunk)
    _receive_from_rank0(peft_model, weights, buffers, is_main)
    return root


def _to_meta_keeping_shared_weights(model) -> None:
    """Move ``model`` to the meta device. ``Module.to`` gives every module a new parameter of
    its own there, so a weight two modules share (an LM head tied to the embedding) is shared
    again afterwards, as it is in the other ranks' meta models."""
    owners: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(parameter), []).append(name)
    model.to("meta")
    for first, *others in (names for names in owners.values() if len(names) > 1):
        parameter = model.get_parameter(first)
        for name in others:
            module, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(module), attribute, parameter)


def shard_empty(peft_model, device: torch.device, world_size: int, loss_chunk: int) -> WindowLoss:
    """Shard a model that is on the meta device; returns the root, its shards allocated on
    ``device`` but not initialized (the caller fills them; buffers too)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    root = WindowLoss(peft_model, loss_chunk)
    mesh = init_device_mesh(device.type, (world_size,))
    for layer in decoder_layers(peft_model):  # bottom-up: the layers, then the root takes the rest
        fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            # Sum the gradients of the ranks' passes (FSDP would average them); plain sums
            # only, which every backend has (gloo lacks NCCL's pre-multiplied sum).
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    root.to_empty(device=device)
    return root


def _receive_from_rank0(peft_model, weights: dict, buffers: dict, is_main: bool) -> None:
    """Fill every rank's shards (and its unsharded buffers) from rank 0's whole tensors."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    with torch.no_grad():
        for name, buffer in peft_model.named_buffers():
            if is_main:
                buffer.copy_(buffers[name])
            dist.broadcast(buffer, src=0)
    set_model_state_dict(peft_model, weights,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


# ---------------------------------------------------------------- whole tensors for the files

def full_trainable_state(peft_model) -> dict[str, torch.Tensor]:
    """The trained weights, whole, on the host, by parameter name.

    Sharded: gathered from every rank (a collective: every rank calls it) and returned on
    rank 0 only (the other ranks get an empty dict)."""
    own = trainable_parameters(peft_model)
    if not is_sharded(peft_model):
        return {name: p.detach().cpu() for name, p in own.items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(peft_model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
    return {name: state[name] for name in own} if state else {}


def full_optimizer_state(peft_model, optimizer) -> dict:
    """``optimizer.state_dict()`` as one process has it (parameters numbered in order),
    gathered whole on rank 0 when sharded (a collective; the other ranks get ``{}``)."""
    if not is_sharded(peft_model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(peft_model, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))
    if not state:
        return {}
    number = {name: index for index, name in enumerate(trainable_parameters(peft_model))}
    return {"state": {number[name]: value for name, value in state["state"].items()},
            "param_groups": [{**group, "params": [number[name] for name in group["params"]]}
                             for group in state["param_groups"]]}


def load_trainable_state(peft_model, state: dict[str, torch.Tensor]) -> None:
    """Put whole trained weights (every rank holds them) into the model, sharded or not."""
    own = trainable_parameters(peft_model)
    if not is_sharded(peft_model):
        with torch.no_grad():
            for name, parameter in own.items():
                parameter.copy_(state[name])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(peft_model, {name: state[name] for name in own},
                         options=StateDictOptions(full_state_dict=True, strict=False))


def load_optimizer_state(peft_model, optimizer, state: dict) -> None:
    """The inverse of :func:`full_optimizer_state` (every rank holds the whole state)."""
    if not is_sharded(peft_model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = list(trainable_parameters(peft_model))
    by_name = {"state": {names[index]: value for index, value in state["state"].items()},
               "param_groups": [{**group, "params": [names[index] for index in group["params"]]}
                                for group in state["param_groups"]]}
    set_optimizer_state_dict(peft_model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
