"""The GGUF target: llama.cpp's Q4_0 weights with Q8_0 activations, exported as a GGUF file
(see :mod:`.target`)."""
