"""Prefect tasks: thin wrappers around ``transferlab.stages`` (the layer between the library
and the flows in ``transferlab_flows``)."""

from transferlab_flows.tasks.stages import run_stage, stage_cache_key

__all__ = ["run_stage", "stage_cache_key"]
