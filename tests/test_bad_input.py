"""Bad input at every public entry point is one clear error naming the argument (ValueError/TypeError in Python,
exit code 2 and one line for the command-line tools), never a raw traceback from deep inside, and never a silent
wrong result: text that is not UTF-8, a data format that does not match the file, op / layer / generate arguments,
CLI flags. Also: the presets export to the reference library, and a Pallas backend off its platform says it is
interpreted."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base, gsa_340m, lm_tiny, mqar
from gsa_jax.convert import fla
from gsa_jax.convert.io import ConversionError
from gsa_jax.data import config as data_config
from gsa_jax.data import sources
from gsa_jax.eval import __main__ as eval_cli
from gsa_jax.generate import decode_step, generate, prefill
from gsa_jax.layers import CausalSelfAttention, GatedSlotAttention
from gsa_jax.models import GSALM, GSAConfig, PRESETS
from gsa_jax.ops import gated_slot_attention
from gsa_jax.train.config import model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def text_data(path, **overrides):
  cfg = data_config.data_config_defaults()
  cfg.source, cfg.path = "text", str(path)
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


# ---- text that is not UTF-8 ----------------------------------------------------------------------------------------

def test_text_that_is_not_utf8_is_an_error_naming_file_and_offset(tmp_path):
  latin1 = tmp_path / "latin1.txt"
  latin1.write_bytes("plain line\n".encode() + "café naïve\n".encode("latin-1") * 3)
  with pytest.raises(ValueError, match=r"data.path: '.*latin1.txt' is not UTF-8: byte offset 14 \(line 2\) is "
                                       r"b'\\xe9 na', 6 such byte\(s\) in all"):
    data_config.validate_data_config(text_data(latin1), seq_len=16, read_all=True)
  noise = tmp_path / "noise.txt"
  noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
  with pytest.raises(ValueError, match=r"'.*noise.txt' is not UTF-8"):
    data_config.validate_data_config(text_data(noise), seq_len=16, read_all=True)
  # A character cut by the scan's chunk border is not an error.
  text = tmp_path / "utf8.txt"
  text.write_text("é" * 5000 + "\n", encoding="utf-8")
  assert sources.utf8_errors(str(text), chunk_bytes=1001) == (0, None)
  assert sources.utf8_errors(str(latin1), chunk_bytes=5) == (6, 14)


def test_decode_errors_replace_counts_and_reports(tmp_path, caplog):
  latin1 = tmp_path / "latin1.txt"
  latin1.write_bytes("café naïve\n".encode("latin-1") * 3)
  cfg = text_data(latin1, decode_errors="replace")
  with caplog.at_level(logging.WARNING):
    data_config.validate_data_config(cfg, seq_len=16, read_all=True)
  assert "6 byte(s) of" in caplog.text and "are not UTF-8 (the first at offset 3)" in caplog.text
  source = sources.DocumentSource(sources.resolve_files(cfg.path, cfg.format), text_field="text",
                                  txt_document="line", record_format="auto", decode_errors="replace")
  assert source[0] == "caf\ufffd na\ufffdve"
  strict = sources.DocumentSource(sources.resolve_files(cfg.path, cfg.format), text_field="text",
                                  txt_document="line", record_format="auto")
  with pytest.raises(ValueError, match=r"data.path: .*latin1.txt line 1 is not UTF-8"):
    strict[0]  # pylint: disable=pointless-statement


def test_checking_a_large_corpus_shows_progress(tmp_path, caplog, monkeypatch):
  # Every txt/jsonl byte is read before a run starts: minutes for a paper-scale corpus, so it says so as it goes.
  for i in range(3):
    (tmp_path / f"part{i}.txt").write_text("some text\n" * 100)
  cfg = text_data(tmp_path / "part*.txt")
  monkeypatch.setattr(data_config, "PROGRESS_BYTES", 1000)
  monkeypatch.setattr(data_config, "PROGRESS_EVERY_S", 0.0)
  with caplog.at_level(logging.INFO, logger="gsa_jax.data.config"):
    data_config.validate_data_config(cfg, seq_len=16, read_all=True)
  lines = [r.getMessage() for r in caplog.records if r.name == "gsa_jax.data.config"]
  assert lines == ["checking the data: every byte of 0.0 GB of txt/jsonl (3 files) is read before the run starts",
                   "checking the data: 0.0 of 0.0 GB read", "checking the data: 0.0 of 0.0 GB read",
                   "checking the data: 0.0 of 0.0 GB read"], lines
  caplog.clear()
  monkeypatch.setattr(data_config, "PROGRESS_BYTES", 1 << 30)
  with caplog.at_level(logging.INFO, logger="gsa_jax.data.config"):
    data_config.validate_data_config(cfg, seq_len=16, read_all=True)
  assert not [r for r in caplog.records if r.name == "gsa_jax.data.config"]  # small corpora: silent


def test_a_jsonl_file_whose_texts_are_all_empty_is_refused(tmp_path):
  # Every record would be filtered out and the pipeline would wait forever for a first batch.
  path = tmp_path / "empty_texts.jsonl"
  path.write_text('{"text": ""}\n' * 20)
  with pytest.raises(ValueError, match=r"has no document: the 'text' of every line is empty"):
    data_config.validate_data_config(text_data(path), seq_len=16, read_all=True)


# ---- the data format -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset,name,fmt", [(lm_tiny, "docs.jsonl", "jsonl"), (gsa_340m, "docs.txt", "txt")])
def test_presets_infer_the_format_from_the_extension(tmp_path, preset, name, fmt):
  (tmp_path / "docs.jsonl").write_text('{"text": "hello"}\n{"text": "world"}\n')
  (tmp_path / "docs.txt").write_text("hello\nworld\n")
  cfg, path = preset.get_config().data, str(tmp_path / name)
  assert sources.resolve_files(path, cfg.format) == [(path, fmt)]
  source = sources.DocumentSource(sources.resolve_files(path, cfg.format), text_field=cfg.text_field,
                                  txt_document=cfg.txt_document, record_format=cfg.record_format)
  assert [source[0], source[1]] == ["hello", "world"]  # the text field of a jsonl line, not the raw JSON


def test_a_format_that_contradicts_the_extension_is_refused_and_markdown_reads_as_text(tmp_path):
  (tmp_path / "docs.jsonl").write_text('{"text": "hello"}\n')
  with pytest.raises(ValueError, match=r"data.format: is 'txt' but '.*docs.jsonl' has the extension of a jsonl file"):
    sources.resolve_files(str(tmp_path / "docs.jsonl"), "txt")
  (tmp_path / "notes.md").write_text("# a title\nsome text\n")
  assert sources.resolve_files(str(tmp_path / "*.md"), "auto") == [(str(tmp_path / "notes.md"), "txt")]
  # A directory's READMEs stay out of the corpus.
  assert sources.resolve_files(str(tmp_path), "auto") == [(str(tmp_path / "docs.jsonl"), "jsonl")]


def test_a_parquet_file_whose_texts_are_all_empty_is_refused(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

  pq.write_table(pa.table({"text": ["", None] * 10}), tmp_path / "empty.parquet")
  with pytest.raises(ValueError, match=r"'.*empty.parquet' has no document: every 'text' is empty or null"):
    data_config.validate_data_config(text_data(tmp_path / "empty.parquet"), seq_len=16, read_all=True)
  pq.write_table(pa.table({"text": ["", None, "one"]}), tmp_path / "one.parquet")
  data_config.validate_data_config(text_data(tmp_path / "one.parquet"), seq_len=16, read_all=True)


def test_a_parquet_text_column_of_another_type_is_refused(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

  pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
  with pytest.raises(ValueError, match=r"data.text_field: column 'text' of '.*ints.parquet' holds int64, not strings"):
    data_config.validate_data_config(text_data(tmp_path / "ints.parquet"), seq_len=16)


# ---- the op and the layer ------------------------------------------------------------------------------------------

def op_inputs(b=1, t=8, h=2, k=4, v=4, m=4):
  ones = lambda *shape: jnp.ones(shape, jnp.float32)
  return ones(b, t, h, k), ones(b, t, h, k), ones(b, t, h, v), 0.5 * ones(b, t, h, m), -0.1 * ones(b, t, h, m)


@pytest.mark.parametrize("inputs,kwargs,error,message", [
    (dict(k=0), {}, ValueError, r"q has shape \(1, 8, 2, 0\): its last axis \(K\) must be at least 1"),
    (dict(v=0), {}, ValueError, r"v has shape \(1, 8, 2, 0\): its last axis \(V\) must be at least 1"),
    (dict(m=0), {}, ValueError, r"s has shape \(1, 8, 2, 0\): its last axis \(M\) must be at least 1"),
    ({}, dict(chunk_size=True), TypeError, r"chunk_size must be an int \(a positive power of two\); got bool True"),
    ({}, dict(chunk_size=12), ValueError, r"chunk_size=12 must be a positive power of two"),
    ({}, dict(segment_ids=[[1] * 8]), TypeError, r"segment_ids must be None or an int array \[B, T\]; got list"),
    ({}, dict(scale="0.5"), TypeError, r"scale must be None or a finite number or a jax.Array scalar; got str '0.5'"),
    ({}, dict(initial_state=([0.0], [0.0])), TypeError, r"initial_state\[0\] \(hk\) must be an array; got list"),
    ({}, dict(kernel_block_sizes="pallas_gpu.block_k=100"), ValueError,
     r"kernel_block_sizes: pallas_gpu: BlockSizes.block_k=100; expected a power of two >= 16"),
    ({}, dict(kernel_block_sizes="pallas_gpu.blockk=64"), ValueError,
     r"kernel_block_sizes: pallas_gpu has no tile setting \['blockk'\]; its fields are \['chunk', 'block_k'"),
    ({}, dict(kernel_block_sizes="triton.block_k=64"), ValueError,
     r"kernel_block_sizes: 'triton' is not a kernel backend; expected one of \('pallas_gpu', 'pallas_mgpu', "),
    ({}, dict(kernel_block_sizes="pallas_gpu:block_k=64"), ValueError,
     r"'pallas_gpu:block_k=64' is not BACKEND.FIELD=VALUE \(e.g. 'pallas_gpu.block_k=128'\)"),
    ({}, dict(kernel_block_sizes={"pallas_tpu": {"chunk": "big"}}), ValueError,
     r"kernel_block_sizes: pallas_tpu: BlockSizes.chunk='big' must be a positive multiple of 16"),
    ({}, dict(kernel_block_sizes=64), TypeError, r"kernel_block_sizes must be None, a 'BACKEND.FIELD=VALUE,...'"),
])
def test_op_arguments_are_checked(inputs, kwargs, error, message):
  with pytest.raises(error, match=message):
    gated_slot_attention(*op_inputs(**inputs), backend="chunked", **kwargs)


def test_op_takes_a_numpy_integer_chunk_size():
  q, k, v, s, g = op_inputs(t=16)
  o, _ = gated_slot_attention(q, k, v, s, g, chunk_size=np.int64(4), backend="chunked")
  ref, _ = gated_slot_attention(q, k, v, s, g, chunk_size=4, backend="chunked")
  np.testing.assert_array_equal(o, ref)


@pytest.mark.parametrize("x,error,message", [
    (jnp.ones((1, 8, 8)), ValueError, r"x has shape \(1, 8, 8\); expected \[b, t, d\] with d = hidden_size = 16"),
    (jnp.ones((8, 16)), ValueError, r"x has shape \(8, 16\); expected \[b, t, d\]"),
    (jnp.ones((1, 8, 16), jnp.int32), TypeError, r"x must be a floating-point array; got dtype int32"),
    ([[0.0] * 16], TypeError, r"x must be an array \[b, t, d\]; got list"),
])
@pytest.mark.parametrize("kind", ["gsa", "attention"])
def test_layer_input_is_checked(x, error, message, kind):
  if kind == "gsa":
    layer = GatedSlotAttention(16, num_heads=2, num_slots=4, rngs=nnx.Rngs(0))
    prefill_kw, cache = {}, layer.init_cache(1)
  else:
    layer = CausalSelfAttention(16, num_heads=2, rngs=nnx.Rngs(0))
    prefill_kw, cache = {"max_len": 16}, layer.init_cache(1, 16)
  with pytest.raises(error, match=message):
    layer(x)
  with pytest.raises(error, match=message):
    layer.prefill(x, **prefill_kw)
  with pytest.raises(ValueError, match=r"x has shape \(1, 8, 16\); expected \[b, d\]"):
    layer.step(jnp.ones((1, 8, 16)), cache)


@pytest.mark.parametrize("kind", ["gsa", "attention"])
def test_layer_segment_ids_and_caches_are_checked(kind):
  x = jnp.ones((2, 8, 16))
  if kind == "gsa":
    layer = GatedSlotAttention(16, num_heads=2, num_slots=4, use_short_conv=True, rngs=nnx.Rngs(0))
    other = GatedSlotAttention(16, num_heads=2, num_slots=6, use_short_conv=True, rngs=nnx.Rngs(0))
    prefill_kw, cache, other_cache = {}, layer.init_cache(2), other.init_cache(2)
    name = "GatedSlotAttention"
  else:
    layer = CausalSelfAttention(16, num_heads=2, rngs=nnx.Rngs(0))
    other = CausalSelfAttention(16, num_heads=4, rngs=nnx.Rngs(0))
    prefill_kw, cache, other_cache = {"max_len": 16}, layer.init_cache(2, 16), other.init_cache(2, 16)
    name = "CausalSelfAttention"
  with pytest.raises(ValueError, match=r"segment_ids has shape \(2, 9\); expected \[b, t\] = \[2, 8\]"):
    layer(x, jnp.ones((2, 9), jnp.int32))
  with pytest.raises(ValueError, match=r"segment_ids has shape \(2, 9\)"):
    layer.prefill(x, jnp.ones((2, 9), jnp.int32), **prefill_kw)
  with pytest.raises(TypeError, match=r"segment_ids must be None or an int array \[b, t\] = \[2, 8\]; got list"):
    layer(x, [[1] * 8] * 2)
  with pytest.raises(TypeError, match=r"segment_ids must be integer .* got dtype float32"):
    layer(x, jnp.ones((2, 8)))
  # A cache of another batch size, of a layer with other sizes, of another kind of layer.
  with pytest.raises(ValueError, match=rf"cache.* has shape .*; this {name} expects .* for the input's batch of 3"):
    layer.step(jnp.ones((3, 16)), cache)
  with pytest.raises(ValueError, match=rf"cache.* has shape .*; this {name} expects"):
    layer.step(jnp.ones((2, 16)), other_cache)
  foreign = (CausalSelfAttention(16, num_heads=2, rngs=nnx.Rngs(0)).init_cache(2, 16) if kind == "gsa" else
             GatedSlotAttention(16, num_heads=2, num_slots=4, rngs=nnx.Rngs(0)).init_cache(2))
  with pytest.raises(ValueError, match=rf"cache: not a cache of this {name}"):
    layer.step(jnp.ones((2, 16)), foreign)
  with pytest.raises(ValueError, match=rf"cache.* has shape"):
    layer.prefill(jnp.ones((3, 8, 16)), None, cache)


def test_gsa_cache_without_the_convolution_entries_is_refused():
  conv = GatedSlotAttention(16, num_heads=2, num_slots=4, use_short_conv=True, rngs=nnx.Rngs(0))
  plain = GatedSlotAttention(16, num_heads=2, num_slots=4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"not a cache of this GatedSlotAttention.*use_short_conv"):
    conv.step(jnp.ones((2, 16)), plain.init_cache(2))


def test_a_full_kv_cache_refuses_another_token_and_is_nan_under_jit():
  layer = CausalSelfAttention(16, num_heads=2, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 8, 16))
  _, cache = layer.prefill(x[:, :7], max_len=7)
  with pytest.raises(ValueError, match=r"max_len: the KV cache has max_len=7 slots and holds 7 tokens"):
    layer.step(x[:, 7], cache)
  graphdef, state = nnx.split(layer)
  y, _ = jax.jit(lambda state, x, cache: nnx.merge(graphdef, state).step(x, cache))(state, x[:, 7], cache)
  assert np.isnan(np.asarray(y)).all()  # a write past the end would be clamped onto the last slot: no wrong number
  _, short = layer.prefill(x[:, :5], max_len=6)
  y, _ = jax.jit(lambda state, x, cache: nnx.merge(graphdef, state).prefill(x, None, cache))(state, x[:, 5:8], short)
  assert np.isnan(np.asarray(y)).all()  # 3 tokens into 1 free slot: refused eagerly, NaN under jit
  with pytest.raises(ValueError, match=r"max_len: the KV cache has max_len=6 slots and holds 5 tokens; 3 more"):
    layer.prefill(x[:, 5:8], None, short)
  _, roomy = layer.prefill(x[:, :7], max_len=8)
  y, _ = jax.jit(lambda state, x, cache: nnx.merge(graphdef, state).step(x, cache))(state, x[:, 7], roomy)
  np.testing.assert_allclose(y, layer(x)[:, 7], rtol=1e-5, atol=1e-5)


# ---- generation ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_lm():
  cfg = GSAConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, num_slots=4, intermediate_size=32,
                  backend="chunked")
  return GSALM(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("prompts,kwargs,error,message", [
    ([[3, 4, 5, 0]], dict(lengths=[3, 0]), ValueError, r"lengths has shape \(2,\)"),
    ([[3, 4, 5, 0], [6, 7, 0, 0]], dict(lengths=[3, 0]), ValueError,
     r"row 1 of the prompts has 0 tokens \(lengths\); every prompt needs at least one"),
    ([[3, 4, 5, 0], [6, 7, 0, 0]], dict(lengths=[3, 5]), ValueError,
     r"lengths\[1\] = 5 is longer than the prompts \(t = 4\)"),
    ([[3, 4, 5, 0], [6, 7, 0, 0]], dict(lengths=[3, -1]), ValueError, r"row 1 of the prompts has -1 tokens"),
    ([[3, 4, 5, 0], [6, 7, 0, 0]], dict(segment_ids=[[1, 1, 1, 0], [0, 0, 0, 0]]), ValueError,
     r"row 1 of the prompts has 0 tokens \(segment_ids\)"),
    ([[3, 4, 40]], {}, ValueError, r"prompts holds token id 40; expected ids in \[0, 32\) \(the model's vocab_size\)"),
    ([[3, -4, 5]], {}, ValueError, r"prompts holds token id -4"),
    (np.zeros((2, 0), np.int32), {}, ValueError, r"prompts has shape \(2, 0\): every prompt needs at least one token"),
    ([3, 4, 5], {}, ValueError, r"prompts has shape \(3,\); expected \[b, t\] .*prompts\[None\]"),
    ([[3.0, 4.0]], {}, TypeError, r"prompts must be an integer array; got dtype float32"),
])
def test_generate_checks_its_prompts(small_lm, prompts, kwargs, error, message):
  kwargs = {k: jnp.asarray(v) for k, v in kwargs.items()}
  with pytest.raises(error, match=message):
    generate(small_lm, jnp.asarray(prompts), max_new_tokens=2, temperature=0.0, **kwargs)
  with pytest.raises(error, match=message):
    prefill(small_lm, jnp.asarray(prompts), **kwargs)


def test_decode_step_refuses_a_full_kv_cache_and_a_wrong_cache_list():
  cfg = GSAConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, num_slots=4, intermediate_size=32,
                  attn_layers=(1,), attn_implementation="xla", backend="chunked")
  model = GSALM(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.asarray([[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]])
  _, caches = prefill(model, tokens[:, :4])  # no room left by default
  with pytest.raises(ValueError, match=r"KV cache has max_len=4 slots and holds 4 tokens"):
    decode_step(model, tokens[:, 4], caches)
  _, caches = prefill(model, tokens[:, :4], max_len=5)
  with pytest.raises(ValueError, match=r"caches: the model has 2 layers and needs one cache per layer.*got 1 caches"):
    model.step(tokens[:, 4], caches[:1])
  with pytest.raises(ValueError, match=r"caches: the model has 2 layers"):
    model.prefill(tokens, max_len=8, caches=caches[:1])
  with pytest.raises(ValueError, match=r"segment_ids has shape \(2, 4\); expected \[b, t\] = \[2, 5\]"):
    model(tokens, jnp.ones((2, 4), jnp.int32))
  with pytest.raises(ValueError, match=r"for the input's batch of 1"):
    decode_step(model, tokens[:1, 4], caches)


def test_model_tokens_are_checked(small_lm):
  with pytest.raises(ValueError, match=r"tokens has shape \(4,\); expected \[b, t\]"):
    small_lm(jnp.arange(4))
  with pytest.raises(TypeError, match=r"tokens must be an integer array \[b, t\]; got dtype float32"):
    small_lm(jnp.ones((1, 4)))


# ---- command-line tools --------------------------------------------------------------------------------------------

def run_module(*args):
  return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("args,message", [
    (["--backends", "foo"], r"--backends: unknown \['foo'\]; expected a comma-separated subset of"),
    (["--t", "0"], r"--t must be >= 1, got 0"),
    (["--dtypes", "int32"], r"--dtypes: unknown \['int32'\]"),
    (["--chunk-size", "12"], r"--chunk-size must be a positive power of two, got 12"),
    (["--hq", "3", "--h", "2"], r"--hq=3 must be a multiple of --h=2"),
    (["--kernel-block-sizes", "pallas_gpu.num_warps=3"],
     r"--kernel-block-sizes: pallas_gpu: BlockSizes.num_warps=3; expected 1, 2, 4, 8 or 16"),
])
def test_ops_check_refuses_bad_flags_in_one_line(args, message):
  result = run_module("gsa_jax.ops.check", *args)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: ")
  assert re.search(message, result.stderr), result.stderr


def test_plot_out_that_is_a_file_is_one_line_exit_2(tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
  (tmp_path / "a_file").write_text("x")
  for out, message in ((tmp_path / "a_file", "is a file; give a directory"),
                       (tmp_path / "a_file" / "plots", "cannot create the directory")):
    result = run_module("gsa_jax.plot", str(run), "--out", str(out))
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr, result.stderr


def test_eval_output_is_checked_before_the_evaluation(tmp_path, capsys):
  (tmp_path / "a_file").write_text("x")
  # The run directory does not exist: the output is refused before anything is loaded or computed.
  for out, message in ((tmp_path, "is a directory; give a file path"),
                       (tmp_path / "a_file" / "r.json", "lies under '.*a_file', which is a file")):
    assert eval_cli.main(["--checkpoint", str(tmp_path / "no_run"), "--task", "perplexity", "--data", "x.txt",
                          "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: --output '.*' " + message, err), err


# ---- export to the reference library -------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["lm_tiny", "mqar", "base"] + sorted(PRESETS))
def test_default_configs_and_paper_presets_export_to_the_reference(preset):
  if preset in PRESETS:
    cfg = PRESETS[preset]()
  else:
    cfg = model_config({"lm_tiny": lm_tiny, "mqar": mqar, "base": base}[preset].get_config())
  fla.config_to_fla(cfg)  # raises ConversionError for what the reference cannot represent


def test_an_output_norm_eps_the_reference_lacks_names_the_key_to_set():
  with pytest.raises(ConversionError, match=r"eps is 1e-06 .*--config.model.output_norm_eps=1e-5.*\"output_norm_eps\""):
    fla.config_to_fla(GSAConfig(output_norm_eps=1e-6))


# ---- Pallas backends off their platform ----------------------------------------------------------------------------

@pytest.mark.skipif(jax.default_backend() == "gpu", reason="interpret mode is only used off the GPU")
def test_pallas_gpu_off_the_gpu_says_once_that_it_is_interpreted(caplog):
  from pallas_kernels import gsa_gpu  # pylint: disable=import-outside-toplevel

  gsa_gpu._log_once.cache_clear()  # pylint: disable=protected-access
  q, k, v, s, g = op_inputs(t=16)
  with caplog.at_level(logging.WARNING):
    for t in (16, 32):  # two compilations, one message
      gated_slot_attention(*(jnp.concatenate([x] * (t // 16), axis=1) for x in (q, k, v, s, g)),
                           backend="pallas_gpu")
  messages = [r.getMessage() for r in caplog.records if "interpret mode" in r.getMessage()]
  assert len(messages) == 1 and "backend 'pallas_gpu' on cpu runs its kernels in Pallas interpret mode" in messages[0]


def test_eval_names_the_file_and_offset_of_text_that_is_not_utf8(tmp_path, capsys):
  from gsa_jax.eval.data import DataError, read_documents  # pylint: disable=import-outside-toplevel

  for name, text in (("latin1.txt", "café\n"), ("latin1.jsonl", '{"text": "café"}\n')):
    (tmp_path / name).write_bytes(("fine\n" if name.endswith(".txt") else '{"text": "fine"}\n').encode()
                                  + text.encode("latin-1"))
    with pytest.raises(DataError, match=r"'.*latin1.(txt|jsonl)' is not UTF-8: byte offset \d+ \(line 2\)"):
      read_documents(str(tmp_path / name))


def test_convert_output_under_a_file_is_one_line_exit_2(tmp_path):
  (tmp_path / "a_file").write_text("x")
  out = tmp_path / "a_file" / "exported"
  result = run_module("gsa_jax.convert", "to-fla", str(tmp_path / "no_run"), str(out))
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().count("\n") == 0, result.stderr
  assert "lies under" in result.stderr and "which is a file" in result.stderr, result.stderr


@pytest.mark.parametrize("script,args,message", [
    ("mqar_sweep.py", ["--grid", "cpu", "--out", "{file}"], r"--out .*a_file: is a file; give a directory"),
    ("mqar_gate_probe.py", ["--run", "{missing}"], r"error: .*config.json does not exist: .* is not a run directory"),
])
def test_benchmark_scripts_refuse_bad_paths_with_exit_2(tmp_path, script, args, message):
  (tmp_path / "a_file").write_text("x")
  paths = {"file": tmp_path / "a_file", "missing": tmp_path / "no_run"}
  result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *[a.format(**paths) for a in args]],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "Traceback" not in result.stderr and re.search(message, result.stderr), result.stderr[-2000:]
