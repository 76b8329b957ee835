"""The bundled default model's names, apart from its converter (rapid.model.default_model), which needs numpy."""

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # also the stem of its GGUF file and of its cache folder
DEFAULT_MODEL_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"  # its Hugging Face name, which clients may also send
