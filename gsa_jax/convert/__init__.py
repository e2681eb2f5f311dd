"""Checkpoint conversion between our run directories and Hugging Face-format checkpoints: the reference library's
GSA models (from-fla / to-fla) and Llama/Mistral Transformers for T2R finetuning (from-llama). CLI: __main__.py."""

from gsa_jax.convert.io import ConversionError, read_run_params, read_safetensors_dir, write_run_dir

__all__ = ["ConversionError", "read_run_params", "read_safetensors_dir", "write_run_dir"]
