"""herd: Llama 3.1 end to end in plain PyTorch."""

from .config import CONFIGS, ModelArgs, get_config
from .model import Transformer

__version__ = "0.1.0"
__all__ = ["CONFIGS", "ModelArgs", "Transformer", "get_config", "__version__"]


def __getattr__(name: str):
    # herd.load / herd.LLM come from api.py, imported on first use so `import herd` stays light
    if name in ("load", "LLM"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'herd' has no attribute {name!r}")
