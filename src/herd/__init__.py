"""herd: Llama 3.1 end to end in plain PyTorch."""

from .config import CONFIGS, ModelArgs, get_config
from .model import Transformer

__version__ = "0.1.0"
__all__ = ["CONFIGS", "ModelArgs", "Transformer", "get_config", "__version__"]
