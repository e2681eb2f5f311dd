"""The all-attention baseline of the 1.3B preset: the same model and recipe (configs/gsa_1p3b.py) with causal softmax
attention (RoPE, 16 heads of width 128) at every layer instead of GSA (`gsa_jax.models.all_attention`)."""

from configs.gsa_1p3b import get_config as gsa_config
from gsa_jax.models import all_attention, gsa_1p3b


def get_config():
  c = gsa_config()
  c.workdir = "runs/attention_1p3b"
  model = all_attention(gsa_1p3b())
  c.model.attn_layers = model.attn_layers
  c.model.attn_num_heads = model.attn_num_heads
  return c
