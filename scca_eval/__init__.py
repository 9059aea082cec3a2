"""scca-eval: perplexity of long-context language models under sparse attention patterns."""

__version__ = "0.1.0"

# The public API: everything else is reached through these.
__all__ = ["__version__", "EvalSettings", "TrainSettings", "evaluate", "finetune", "load_model", "read_records"]


def __getattr__(name):
    # Imported lazily so that `scca-eval --help` and the table commands start fast
    # and need no model stack.
    if name == "EvalSettings":
        from .evaluation.settings import EvalSettings

        return EvalSettings
    if name == "TrainSettings":
        from .training.settings import TrainSettings

        return TrainSettings
    if name == "evaluate":
        from .api import evaluate

        return evaluate
    if name == "finetune":
        from .training import finetune

        return finetune
    if name == "load_model":
        from .models import load_model

        return load_model
    if name == "read_records":
        from .report.frame import read_records

        return read_records
    raise AttributeError(name)
