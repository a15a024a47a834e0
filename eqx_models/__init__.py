"""eqx_models: MaxText's LLM model stack as pure-pytree Equinox modules, numerically faithful to HuggingFace."""

__version__ = "0.1.0"

from eqx_models import layers as layers
from eqx_models.config import (
    Qwen3Config as Qwen3Config,
    Qwen3MoeConfig as Qwen3MoeConfig,
    Qwen3NextConfig as Qwen3NextConfig,
    Qwen3OmniThinkerConfig as Qwen3OmniThinkerConfig,
)
from eqx_models.hf import from_pretrained as from_pretrained, save_pretrained as save_pretrained
from eqx_models.models.qwen3 import (
    Qwen3ForCausalLM as Qwen3ForCausalLM,
    Qwen3MoeForCausalLM as Qwen3MoeForCausalLM,
    Qwen3NextForCausalLM as Qwen3NextForCausalLM,
)
from eqx_models.models.qwen3_omni import (
    Qwen3OmniThinkerForConditionalGeneration as Qwen3OmniThinkerForConditionalGeneration,
)
from eqx_models.generation import generate as generate
