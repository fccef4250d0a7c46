"""dpolab: Direct Preference Optimization for small causal language models, end to end."""

__version__ = "0.1.0"
EMBEDDED_MODEL = "smollm2-135m-instruct"
