"""MQAR (multi-query associative recall): the default config. A 2-layer GSA learns to recall on a CPU in minutes.

    python train.py                                  # this config: about 4-5 minutes on 2 CPU cores
    python train.py --config.model.num_slots=8       # fewer slots
    python train.py --config.data.mqar_num_kv_pairs=8 --config.train.seq_len=64 --config.train.steps=3000

Each sequence holds 4 key-value pairs followed by queries of those keys; only the answers count (loss_mask), so
`eval_accuracy` is the recall accuracy. On 2026-11-25, from a fresh clone on 2 CPU cores, this config reached
96.1% held-out accuracy at step 800 (docs/results.md).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.workdir = "runs/mqar"
  c.data.source = "mqar"
  c.data.mqar_vocab_size = 64
  c.data.mqar_num_kv_pairs = 4
  c.train.seq_len = 32
  c.train.batch_size = 64
  c.train.steps = 800
  c.train.log_every = 50
  c.train.eval_every = 100
  c.train.eval_batches = 8
  c.optim.learning_rate = 1e-2
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.1
  c.checkpoint.every_steps = 200
  m = c.model
  m.vocab_size = 64
  m.hidden_size = 128
  m.num_layers = 2
  m.num_heads = 2
  m.num_slots = 32
  m.intermediate_size = 256
  m.use_short_conv = True
  m.tie_embeddings = True
  # Short chunks: the chunked form costs O(chunk^2 * slots) per token and a CPU feels it.
  m.chunk_size = 16
  return c
