"""llama.cpp GGUF files: the container (`file`), the language model (`model`), the vision
projector (`mmproj`) and the tokenizer (`tokenizer`)."""
