"""Bundled task files (YAML) and sample texts, installed as ``scca_eval.tasks``."""
