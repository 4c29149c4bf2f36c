"""What every model family shares: the project's model config (`config.py`), reading a Hugging
Face config.json into it (`hf_config.py`), the Megatron builder (`builder.py`), the family
registry (`families.py`), and the layers and helpers the families build on (`heads.py`,
`norm.py`, `rope.py`, `sdpa.py`). It imports no family: the families (`models/llama.py`,
`models/gemma/`, `models/qwen/`) import it and register themselves, and `models/__init__.py`, above
both, imports them all."""
