"""Prefect tasks: thin wrappers around ``transferlab.stages``."""

from tasks.stages import run_stage, stage_cache_key

__all__ = ["run_stage", "stage_cache_key"]
