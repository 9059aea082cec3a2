"""Fine-tuning under an attention pattern: LoRA (peft) with LongLoRA's recipe.

``finetune(model, ctx=, out=, pattern=, ...)`` (``run.py``) trains and writes an adapter
folder that ``ppl --adapter`` loads. One job per module: ``recipe.py`` the options and
their defaults, ``windows.py`` the training windows, ``lora.py`` peft and the fully
trained weights, ``loop.py`` one optimizer step, ``sharding.py`` the model split over
several processes (FSDP2, ``--shard``), ``validation_loss.py`` the validation loss under
full attention, ``convergence.py`` the rule that says whether it has flattened,
``tensorboard_log.py`` TensorBoard event files, ``checkpoint.py`` checkpoints and the
output folder (training.json is built in ``records/build.py``).
"""

from .recipe import Recipe
from .run import finetune

__all__ = ["Recipe", "finetune"]
