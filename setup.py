"""The package list of the wheel; everything else is in pyproject.toml.

Every folder under scca_eval/ with an __init__.py is found, so a new subpackage cannot be
left out; tasks/ and results/reference/ live outside scca_eval/ and are installed as
scca_eval.tasks and scca_eval.reference (package-dir in pyproject.toml).
"""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["scca_eval", "scca_eval.*"]) + ["scca_eval.tasks", "scca_eval.reference"])
