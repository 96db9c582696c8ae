"""VideoGPT world-model toolkit: episode store, VQ-VAE tokenizer, GPT prior, bundles.

Data flows one way: sources -> store -> tokenizer -> prior -> bundle. Nothing here imports
from :mod:`envs` (the Gymnasium side), which is downstream.
"""

__version__ = "0.1.0"
