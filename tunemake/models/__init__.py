"""Native PyTorch models, HF checkpoints and tokenizers (imported only inside step processes)."""

from tunemake.models.checkpoint import load_model, read_config, save_checkpoint
from tunemake.models.llama import ModelArgs, Transformer

__all__ = ["ModelArgs", "Transformer", "load_model", "read_config", "save_checkpoint"]
