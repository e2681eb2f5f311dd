"""Data pipeline for the trainer: MQAR (synthetic recall) and packed text, on grain, with resumable iterators.

  cfg = data_config_defaults()
  validate_data_config(cfg, seq_len=2048)
  it = make_iterator(cfg, split="train", batch_size=8, seq_len=2048, seed=0,
                     shard_index=jax.process_index(), shard_count=jax.process_count())
  batch = next(it)  # tokens, targets, loss_mask, segment_ids, positions: [8, 2048] numpy arrays
  state = it.get_state(); it.set_state(state)  # exact resume
"""

from gsa_jax.data.config import data_config_defaults, validate_data_config
from gsa_jax.data.pipeline import DataIterator, dataset_vocab_size, make_iterator, split_documents
from gsa_jax.data.tokenizer import ByteTokenizer, TokenizerLoadError, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "DataIterator",
    "TokenizerLoadError",
    "data_config_defaults",
    "dataset_vocab_size",
    "load_tokenizer",
    "make_iterator",
    "split_documents",
    "validate_data_config",
]
