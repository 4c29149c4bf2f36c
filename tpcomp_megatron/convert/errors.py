"""The error a source checkpoint that cannot be read raises (Hugging Face folder or GGUF file)."""


class SourceError(ValueError):
    """The source checkpoint cannot be read (missing, truncated, or of an unsupported kind)."""
