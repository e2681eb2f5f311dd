"""The paper's pretraining recipe (Zhang et al. 2024, section 4), shared by the gsa_* presets.

AdamW with betas (0.9, 0.95), weight decay 0.01, peak learning rate 3e-4 reached after the first 1B tokens
(1907 steps here) then cosine decay, gradient clipping at 1.0, bf16 compute with float32 parameters and optimizer
state, sequences of 2048 tokens. The batch of 256 x 2048 = 0.5M tokens is our assumption (the batch the paper's
lineage, GLA, reports); the paper's text states the token budgets (340M: 15B tokens, 1.3B and 2.7B: 100B). The corpus
and its tokenizer (the paper uses the Mistral tokenizer, vocabulary 32000) must be given:

    python train.py --config=configs/gsa_340m.py --config.data.path='corpus/*.jsonl' \
        --config.data.tokenizer=mistral/tokenizer.json
"""

from configs import base
from gsa_jax.models import PRESETS


def paper_config(preset: str, *, batch_size: int, steps: int, warmup_steps: int):
  c = base.get_config()
  c.workdir = f"runs/{preset}"
  for key, value in PRESETS[preset]().__dict__.items():
    if value is not None:
      c.model[key] = value
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  # At 1.3B, B4 x T4096 on the H100: 50,042 tokens/s at 40.3 GiB, against 49,340 at 36.6 GiB with "matmuls_gsa"
  # (docs/benchmarks.md); a smaller GPU or a larger batch may want "matmuls_gsa" or "matmuls".
  c.model.remat = "matmuls_gsa_keys"
  c.data.source = "text"
  c.data.path = ""  # required: --config.data.path=...
  c.data.tokenizer = ""  # required: a tokenizer.json or SentencePiece .model with 32000 ids
  c.train.seq_len = 2048
  c.train.batch_size = batch_size
  c.train.steps = steps
  c.train.log_every = 10
  c.train.eval_every = 1000
  c.train.eval_batches = 16
  set_paper_optimizer(c, learning_rate=3e-4, warmup_steps=warmup_steps)
  c.checkpoint.every_steps = 1000
  c.checkpoint.every_minutes = 30.0
  return c


def set_paper_optimizer(c, *, learning_rate: float, warmup_steps: int) -> None:
  """The paper's optimizer on config `c`: AdamW (0.9, 0.95), weight decay 0.01, clipping at 1.0, linear warm-up to
  `learning_rate` then cosine decay to a tenth of it."""
  c.optim.learning_rate = learning_rate
  c.optim.warmup_steps = warmup_steps
  c.optim.final_lr_ratio = 0.1
  c.optim.b1, c.optim.b2 = 0.9, 0.95
  c.optim.weight_decay = 0.01
  c.optim.clip_norm = 1.0
