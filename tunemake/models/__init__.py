"""Native PyTorch models, HF checkpoints and tokenizers (imported only inside step processes)."""

from tunemake.models.checkpoint import load_model, read_config, save_checkpoint
from tunemake.models.llama import ModelArgs, Transformer
from tunemake.models.tokenizer import Tokenizer, load_tokenizer

__all__ = ["ModelArgs", "Tokenizer", "Transformer", "load_model", "load_tokenizer", "read_config", "save_checkpoint"]
