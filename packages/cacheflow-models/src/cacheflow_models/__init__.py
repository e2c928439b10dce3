"""cacheflow-models: model code for the cacheflow runtime, the registry, configs and tokenizers."""

from cacheflow_models.default_model import default_model_path
from cacheflow_models.generation_config import load_generation_defaults
from cacheflow_models.hf_config import build_model_config, load_hf_config
from cacheflow_models.registry import resolve_architecture
from cacheflow_models.tokenizer import TOKENIZER_FILES, TokenIdsOnly, has_tokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = ["TOKENIZER_FILES", "TokenIdsOnly", "__version__", "build_model_config",
           "default_model_path", "has_tokenizer", "load_generation_defaults", "load_hf_config",
           "load_tokenizer", "resolve_architecture"]
