"""Language models of about 110M parameters on Python code (benchmarks/code_corpus.py), one per mixer layout, for
equal-budget comparisons (benchmarks/code_lm_compare.py drives them):

    python train.py --config=configs/code_lm.py:gsa --config.data.path='corpus/code/train-*.jsonl' \
        --config.data.tokenizer=corpus/code/tokenizer.json --config.model.vocab_size=16384
    python train.py --config=configs/code_lm.py:attention,tiny ...       # the CPU-sized variant

The argument is LAYOUT[,SIZE]. Layouts: gsa (GSA at every layer), attention (the same model with softmax attention
at every layer: `gsa_jax.models.all_attention`), hybrid (attention at every sixth layer), abc (exact ABC's slot
control, `slot_control="abc"`), nogate (GSA without its forget gate). Sizes: 110m (hidden 768, 12 layers, 4 GSA heads
of width 192 with 64 slots, attention heads of width 128, SwiGLU 2048, untied embeddings: 113M parameters with a
16384-token vocabulary), tiny (hidden 32, 2 layers: for tests).

The paper's recipe scaled down: AdamW (0.9, 0.95), weight decay 0.01, clipping 1.0, warm-up then cosine decay to 10%,
bf16 compute with float32 parameters, sequences of 2048; peak learning rate 1e-3 (the paper's 3e-4 is for 15-100B
tokens; these runs see far fewer). Batch 16 x 2048 tokens. No evaluation split inside the run
(`data.eval_fraction=0`): held-out perplexity is measured afterwards with `gsa_jax.eval` on the held-out packages.
"""

from configs import base
from configs.paper import set_paper_optimizer
from gsa_jax.models import GSAConfig, mixer_layout

LAYOUTS = ("gsa", "attention", "hybrid", "abc", "nogate")
SIZES = {
    "110m": dict(hidden_size=768, num_layers=12, num_heads=4, num_slots=64, intermediate_size=2048),
    "tiny": dict(hidden_size=32, num_layers=2, num_heads=2, num_slots=8, intermediate_size=64, chunk_size=16,
                 dtype="float32"),
}


def model_config(layout: str, size: str, vocab_size: int = 16384) -> GSAConfig:
  """The GSAConfig of a layout and size."""
  if layout not in LAYOUTS:
    raise ValueError(f"configs/code_lm.py: layout {layout!r} is unknown; expected one of {LAYOUTS}")
  if size not in SIZES:
    raise ValueError(f"configs/code_lm.py: size {size!r} is unknown; expected one of {tuple(SIZES)}")
  c = GSAConfig(vocab_size=vocab_size, gate_logit_normalizer=8.0, tie_embeddings=False, elementwise_affine=False,
                norm_eps=1e-6, output_norm_eps=1e-5, **({"dtype": "bfloat16"} | SIZES[size]))
  if layout == "abc":
    return c.replace(slot_control="abc")
  if layout == "nogate":
    return c.replace(forget_gate=False)
  return mixer_layout(c, layout)


def get_config(arg: str = "gsa"):
  layout, _, size = arg.partition(",")
  size = size or "110m"
  c = base.get_config()
  c.workdir = f"runs/code_lm_{layout}_{size}"
  for key, value in model_config(layout, size).__dict__.items():
    if value is not None:
      c.model[key] = value
  c.data.source = "text"
  c.data.format = "jsonl"
  c.data.path = ""  # required: the corpus' train-*.jsonl
  c.data.tokenizer = ""  # required: the corpus' tokenizer.json (set model.vocab_size to its size)
  c.data.eval_fraction = 0.0
  c.data.read_threads = 8
  c.train.seq_len = 2048 if size == "110m" else 64
  c.train.batch_size = 16 if size == "110m" else 4
  c.train.steps = 1000
  c.train.log_every = 10
  set_paper_optimizer(c, learning_rate=1e-3, warmup_steps=50)
  c.checkpoint.every_steps = 100000  # only the final step (and on SIGTERM): these runs are short
  return c
