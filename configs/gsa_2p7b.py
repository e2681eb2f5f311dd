"""GSA 2p7b with the paper's recipe: 100B tokens = 190735 steps of 256 x 2048 tokens. See configs/paper.py."""

from configs.paper import paper_config


def get_config():
  return paper_config("gsa_2p7b", batch_size=256, steps=190735, warmup_steps=1907)
