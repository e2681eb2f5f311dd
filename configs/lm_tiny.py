"""A byte-level language model on local text, small enough for a CPU.

    python train.py --config=configs/lm_tiny.py --config.data.path=corpus.txt

By default it reads this repository's Markdown documentation, so it runs from a fresh clone.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.workdir = "runs/lm_tiny"
  c.data.source = "text"
  c.data.path = "docs/*.md"
  c.data.tokenizer = "byte"
  c.train.seq_len = 256
  c.train.batch_size = 16
  c.train.steps = 500
  c.train.log_every = 20
  c.train.eval_every = 100
  c.train.eval_batches = 4
  c.optim.learning_rate = 2e-3
  c.optim.warmup_steps = 50
  m = c.model
  m.vocab_size = 260
  m.hidden_size = 128
  m.num_layers = 4
  m.num_heads = 2
  m.num_slots = 32
  m.intermediate_size = 384
  m.use_short_conv = True
  m.tie_embeddings = True
  return c
