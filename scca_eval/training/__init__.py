"""Fine-tuning under an attention pattern: LoRA (peft) with LongLoRA's recipe.

``finetune(model, settings)`` (``run.py``) trains and writes an adapter folder that
``ppl --adapter`` loads; ``finetune(model, ctx=, out=, pattern=, steps=, ...)`` builds the
settings from keywords. One job per module: ``settings.py`` the run's settings as one
checked object, ``recipe.py`` how it trains (optimizer, LoRA, steps) and the defaults,
``windows.py`` the training windows, ``lora.py`` peft and the fully trained weights, ``loop.py`` one optimizer step, ``sharding.py`` the model split over
several processes (FSDP2, ``--shard``), ``validation_loss.py`` the validation loss under
full attention, ``convergence.py`` the rule that says whether it has flattened,
``tensorboard_log.py`` TensorBoard event files, ``checkpoint.py`` checkpoints and the
output folder (training.json is built in ``records/build.py``).
"""

from .recipe import Recipe
from .run import finetune
from .settings import TrainSettings

__all__ = ["Recipe", "TrainSettings", "finetune"]
