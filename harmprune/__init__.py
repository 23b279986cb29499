"""harmprune: find, prune and evaluate the weights an LLM uses to generate harmful content."""

__version__ = "0.1.0"
