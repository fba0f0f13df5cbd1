"""tunemake: a make/Bazel-style build system for LLM post-training artifacts."""

__version__ = "0.1.0"
