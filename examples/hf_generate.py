"""Build a tiny random HF Qwen3 with transformers, save it, load it with `em.from_pretrained` and decode greedily
with `em.generate`; the tokens must equal HF `generate`'s.

    python examples/hf_generate.py [--new-tokens 16] [--out DIR]
"""

import argparse
import tempfile

import jax.numpy as jnp
import numpy as np
import torch
import transformers

import eqx_models as em

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--new-tokens", type=int, default=16)
parser.add_argument("--out", default=None, help="where to save the HF checkpoint (default: a temporary directory)")
args = parser.parse_args()

# Weights N(0, 0.2^2) and norm weights away from 1: HF's default 0.02 makes near-uniform logits whose greedy
# output is one repeated token, which would show nothing.
torch.manual_seed(0)
hf_config = transformers.Qwen3Config(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=512, initializer_range=0.2,
)
hf = transformers.Qwen3ForCausalLM(hf_config).eval()
with torch.no_grad():
    for name, param in hf.named_parameters():
        if "norm" in name:
            param.add_(0.3 * torch.randn_like(param))

with tempfile.TemporaryDirectory() as scratch:
    out_dir = args.out or scratch
    hf.save_pretrained(out_dir)
    model = em.from_pretrained(out_dir)
print(f"loaded {type(model).__name__}: {model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, "
      f"vocab {model.config.vocab_size}")

prompt = np.random.default_rng(0).integers(1, 256, (2, 8))
ours = np.asarray(em.generate(model, jnp.asarray(prompt), args.new_tokens, temperature=0.0))
with torch.no_grad():
    theirs = hf.generate(torch.from_numpy(prompt), attention_mask=torch.ones(2, 8, dtype=torch.long),
                         max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0).numpy()
for row in range(prompt.shape[0]):
    print(f"prompt {prompt[row].tolist()}")
    print(f"  ours {ours[row, prompt.shape[1]:].tolist()}")
    print(f"  HF   {theirs[row, prompt.shape[1]:].tolist()}")
if not np.array_equal(ours, theirs):
    raise SystemExit("greedy tokens differ from HF generate")
print("greedy tokens equal HF generate's")
