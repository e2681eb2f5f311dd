"""MQAR (multi-query associative recall): the default config. Trains a 2-layer GSA on CPU in a few minutes.

    python train.py                                  # this config
    python train.py --config.model.num_slots=16      # fewer slots: less recall
"""

from configs import base


def get_config():
  c = base.get_config()
  c.workdir = "runs/mqar"
  c.data.source = "mqar"
  c.data.mqar_vocab_size = 256
  c.data.mqar_num_kv_pairs = 8
  c.train.seq_len = 64
  c.train.batch_size = 64
  c.train.steps = 1500
  c.train.log_every = 50
  c.train.eval_every = 250
  c.train.eval_batches = 8
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.1
  c.checkpoint.every_steps = 500
  m = c.model
  m.vocab_size = 256
  m.hidden_size = 128
  m.num_layers = 2
  m.num_heads = 2
  m.num_slots = 32
  m.intermediate_size = 256
  m.use_short_conv = True
  m.tie_embeddings = True
  return c
