"""T2R: finetune Mistral-7B turned into GSA (the paper's "finetuning pretrained Transformers to RNNs" setting).

    # 1. the Transformer -> a GSA run directory: every weight copied, the slot gate projection new (gsa_jax.convert)
    python -m gsa_jax.convert from-llama Mistral-7B-v0.1/ runs/mistral_gsa_init --num-slots 64
    # 2. finetune from it (the tokenizer is the one the converter copied next to the checkpoint)
    python train.py --config=configs/t2r_mistral.py --config.data.path='slimpajama/*.jsonl'

The model is Mistral-7B's shape (hidden 4096, 32 layers, 32 query heads over 8 kv heads of width 128, SwiGLU 14336,
vocab 32000, RMSNorm eps 1e-5, untied) with each attention replaced by GSA (64 slots, gate normalizer 8, swish
feature map, no positional encoding, as the reference layer): what `from-llama` writes for Mistral-7B-v0.1.
Recipe: 20B tokens (the budget of the paper's T2R comparison, which follows SUPRA) of 256 x 2048-token batches =
38147 steps. The paper's text we could check does not give the optimizer settings; ours are an assumption: AdamW
(0.9, 0.95), weight decay 0.01, clip 1.0, peak learning rate 3e-5 (a continued-training rate, 10x below the
pretraining one, so that the copied weights are not destroyed) after 1000 warm-up steps, cosine to 10%, bf16
compute with float32 parameters and optimizer state, parameters sharded over every device (fsdp).
"""

from configs import base
from configs.paper import set_paper_optimizer


def get_config():
  c = base.get_config()
  c.workdir = "runs/t2r_mistral"
  m = c.model
  m.vocab_size, m.hidden_size, m.num_layers = 32000, 4096, 32
  m.num_heads, m.num_kv_heads, m.num_slots = 32, 8, 64
  m.gate_logit_normalizer, m.feature_map = 8.0, "swish"
  m.intermediate_size, m.norm_eps, m.output_norm_eps = 14336, 1e-5, 1e-5
  m.tie_embeddings = False
  m.dtype, m.param_dtype, m.remat = "bfloat16", "float32", "matmuls"
  c.train.init_from = "runs/mistral_gsa_init"  # python -m gsa_jax.convert from-llama ... runs/mistral_gsa_init
  c.data.source = "text"
  c.data.path = ""  # required: --config.data.path=...
  c.data.tokenizer = "runs/mistral_gsa_init/tokenizer.json"  # copied there by the converter
  c.train.seq_len = 2048
  c.train.batch_size = 256
  c.train.steps = 38147
  c.train.log_every = 10
  c.train.eval_every = 1000
  c.train.eval_batches = 16
  set_paper_optimizer(c, learning_rate=3e-5, warmup_steps=1000)
  c.mesh.data, c.mesh.fsdp = 1, -1
  c.checkpoint.every_steps = 500
  c.checkpoint.every_minutes = 30.0
  return c
