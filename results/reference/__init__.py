"""Published reference figures (YAML), installed as ``scca_eval.reference``."""
