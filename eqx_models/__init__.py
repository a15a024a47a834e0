"""eqx_models: MaxText's LLM model stack as pure-pytree Equinox modules, numerically faithful to HuggingFace."""

__version__ = "0.1.0"

from eqx_models import layers as layers
