"""Train a tiny byte-level Qwen3 on the bundled corpus with a hand-written `eqx.filter_jit` step built from the
library's pieces (`lm_loss`, `make_optimizer`), printing the loss as it goes.

    python examples/train_tiny.py [--steps 60] [--batch 8] [--seq 64]
"""

import argparse
from importlib import resources

import equinox as eqx
import jax
import numpy as np

import eqx_models as em
from eqx_models.training import lm_loss, make_optimizer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=60)
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--seq", type=int, default=64)
parser.add_argument("--layers", type=int, default=2)
args = parser.parse_args()

text = resources.files("eqx_models").joinpath("data/tiny_corpus.txt").read_text(encoding="utf-8")
data = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
cfg = em.Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=args.layers,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
model = em.Qwen3ForCausalLM(cfg, key=jax.random.key(0))
optimizer = make_optimizer(3e-3, total_steps=args.steps, warmup_steps=args.steps // 10)
opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))


@eqx.filter_jit(donate="all-except-first")
def train_step(batch, model, opt_state):
    (loss, metrics), grads = eqx.filter_value_and_grad(lm_loss, has_aux=True)(model, batch)
    updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
    return eqx.apply_updates(model, updates), opt_state, loss


rng = np.random.default_rng(0)
losses = []
for step in range(args.steps):
    starts = rng.integers(0, data.size - args.seq, args.batch)
    batch = {"input_ids": jax.numpy.asarray(data[starts[:, None] + np.arange(args.seq)])}
    model, opt_state, loss = train_step(batch, model, opt_state)
    losses.append(float(loss))
    if step % 10 == 0 or step == args.steps - 1:
        print(f"step {step:4d}  loss {losses[-1]:.3f}")
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} (uniform over bytes: {np.log(256):.3f})")
