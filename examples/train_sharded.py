"""Train a tiny byte-level Qwen3-MoE on 8 simulated CPU devices, printing the loss: an FSDP x expert x tensor
mesh, sharded parameters and optimizer state, expert-parallel MoE with an all-to-all token exchange.

    python examples/train_sharded.py [--steps 20] [--mesh fsdp=2,expert=2,tensor=2]

On real accelerators drop the XLA_FLAGS line; on several hosts call `jax.distributed.initialize()` first (see
the README's "Multi-host" section).
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
from importlib import resources  # noqa: E402

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import eqx_models as em  # noqa: E402
from eqx_models import partitioning  # noqa: E402
from eqx_models.training import make_optimizer, make_train_step  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--mesh", default="fsdp=2,expert=2,tensor=2")
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--seq", type=int, default=32)
args = parser.parse_args()

mesh = partitioning.make_mesh(partitioning.parse_mesh(args.mesh))
print(f"{mesh.devices.size} devices, mesh {dict(mesh.shape)}")

cfg = em.Qwen3MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        max_position_embeddings=256, num_experts=8, num_experts_per_tok=2,
                        moe_intermediate_size=32, norm_topk_prob=True)
model = partitioning.shard(em.Qwen3MoeForCausalLM(cfg, key=jax.random.key(0)), mesh)
print("expert weights", model.transformer.blocks[0].moe_block.wi.sharding.spec)

optimizer = make_optimizer(3e-3, total_steps=args.steps, warmup_steps=2)
opt_state = partitioning.shard(optimizer.init(eqx.filter(model, eqx.is_inexact_array)), mesh)
train_step = make_train_step(optimizer, loss_fn=partitioning.sharded_loss(mesh))

text = resources.files("eqx_models").joinpath("data/tiny_corpus.txt").read_text(encoding="utf-8")
data = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
rng = np.random.default_rng(0)
key = jax.random.key(1)
for step in range(1, args.steps + 1):
    starts = rng.integers(0, len(data) - args.seq, args.batch)
    ids = np.stack([data[s : s + args.seq] for s in starts])
    batch = partitioning.shard_batch({"input_ids": ids, "segment_ids": np.ones_like(ids)}, mesh)
    key, step_key = jax.random.split(key)
    model, opt_state, metrics = train_step(model, opt_state, batch, step_key)
    print(f"step {step:3d}  loss {float(metrics['loss']):.4f}  moe aux {float(metrics['moe_aux_loss']):.4f}")
