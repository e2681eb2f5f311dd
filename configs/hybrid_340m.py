"""A hybrid of the 340M GSA model: softmax attention (RoPE) at every sixth layer, GSA elsewhere."""

from configs.paper import paper_config


def get_config():
  c = paper_config("gsa_340m", batch_size=256, steps=28610, warmup_steps=1907)
  c.workdir = "runs/hybrid_340m"
  c.model.attn_layers = (5, 11, 17, 23)
  c.model.attn_num_heads = 16
  return c
