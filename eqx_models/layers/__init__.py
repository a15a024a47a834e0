"""Building blocks with no model knowledge: projections, norms, MLPs, convolutions, embeddings."""

from eqx_models.layers.conv import Conv2d as Conv2d, DepthwiseCausalConv1D as DepthwiseCausalConv1D
from eqx_models.layers.embeddings import (
    Embed as Embed,
    DeepSeekV4RotaryEmbedding as DeepSeekV4RotaryEmbedding,
    Gemma4PartialRotaryEmbedding as Gemma4PartialRotaryEmbedding,
    LLaMARotaryEmbedding as LLaMARotaryEmbedding,
    LlamaVisionRotaryEmbedding as LlamaVisionRotaryEmbedding,
    PartialRotaryEmbedding as PartialRotaryEmbedding,
    PositionalEmbedding as PositionalEmbedding,
    Qwen3OmniMoeThinkerTextRotaryEmbedding as Qwen3OmniMoeThinkerTextRotaryEmbedding,
    Qwen3OmniMoeVisionPosEmbedInterpolate as Qwen3OmniMoeVisionPosEmbedInterpolate,
    Qwen3OmniMoeVisionRotaryEmbedding as Qwen3OmniMoeVisionRotaryEmbedding,
    RotaryEmbedding as RotaryEmbedding,
    YarnRotaryEmbedding as YarnRotaryEmbedding,
)
from eqx_models.layers.linear import Linear as Linear
from eqx_models.layers.mlp import MLP as MLP, get_activation as get_activation
from eqx_models.layers.norms import (
    GatedRMSNorm as GatedRMSNorm,
    L2Norm as L2Norm,
    LayerNorm as LayerNorm,
    RMSNorm as RMSNorm,
    l2norm as l2norm,
)
