"""StableLM for cacheflow, registered through entry points (see pyproject.toml)."""

from cacheflow_stablelm.model import StableLmForCausalLM

__all__ = ["StableLmForCausalLM"]
