"""A two-minute tour of the eqx_models layers: build, call, check a property, jit and differentiate.

    python examples/layers_tour.py
"""

import equinox as eqx
import jax
import jax.numpy as jnp

from eqx_models.layers import MLP, Embed, RMSNorm, RotaryEmbedding

key_embed, key_mlp, key_q = jax.random.split(jax.random.key(0), 3)
batch, seq, heads, head_dim, embed_dim, vocab = 2, 16, 4, 32, 64, 256

embed = Embed(vocab, embed_dim, key=key_embed)
norm = RMSNorm(embed_dim)
mlp = MLP(embed_dim, 4 * embed_dim, activations=("silu", "linear"), key=key_mlp)
rope = RotaryEmbedding(head_dim, max_timescale=1_000_000.0)

ids = jax.random.randint(key_q, (batch, seq), 0, vocab)
hidden = embed(ids)
hidden = hidden + mlp(norm(hidden))
print(f"tokens {ids.shape} -> hidden {hidden.shape} {hidden.dtype}")

q = jax.random.normal(key_q, (batch, seq, heads, head_dim))
positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
scores = jnp.einsum("bqhd,bkhd->bhqk", rope(q, positions), rope(q, positions))
shifted = jnp.einsum("bqhd,bkhd->bhqk", rope(q, positions + 100), rope(q, positions + 100))
print(f"RoPE scores depend only on relative position: max |diff| after a shift of 100 = "
      f"{float(jnp.max(jnp.abs(scores - shifted))):.2e}")


@eqx.filter_jit
def loss_fn(model, x):
    return jnp.mean(model(x) ** 2)


grads = eqx.filter_grad(loss_fn)(mlp, hidden)
print(f"MLP gradient leaves: {[g.shape for g in jax.tree.leaves(grads)]}")
