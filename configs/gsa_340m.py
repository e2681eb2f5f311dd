"""GSA 340m with the paper's recipe: 15B tokens = 28610 steps of 256 x 2048 tokens. See configs/paper.py."""

from configs.paper import paper_config


def get_config():
  return paper_config("gsa_340m", batch_size=256, steps=28610, warmup_steps=1907)
