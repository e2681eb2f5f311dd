"""benchmarks/mqar_gate_probe.py: gate statistics by MQAR token role, checked against direct computations."""

from __future__ import annotations

import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gsa_jax.data.mqar import mqar_example
from gsa_jax.models import GSAConfig, GSALM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("mqar_gate_probe", os.path.join(ROOT, "benchmarks",
                                                                               "mqar_gate_probe.py"))
gate_probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gate_probe)

KV, T = 4, 32


def examples(n=3):
  ex = [mqar_example(i, seed=0, split="eval", seq_len=T, vocab_size=40, num_kv_pairs=KV, power_a=0.01)
        for i in range(n)]
  return np.stack([e["tokens"] for e in ex]), np.stack([e["loss_mask"] for e in ex]) > 0


def model(**kw):
  c = GSAConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=2, num_slots=5, chunk_size=8,
                intermediate_size=48, attn_layers=(1,), **kw)
  return GSALM(c, rngs=nnx.Rngs(0))


def test_roles_follow_the_mqar_layout():
  tokens, query = examples()
  roles = gate_probe.token_roles(tokens, KV, query)
  assert (roles[:, 0:2 * KV:2] == gate_probe.ROLES.index("key")).all()
  assert (roles[:, 1:2 * KV:2] == gate_probe.ROLES.index("value")).all()
  assert (roles[query] == gate_probe.ROLES.index("query")).all()
  assert (roles[:, 2 * KV:][~query[:, 2 * KV:]] == gate_probe.ROLES.index("filler")).all()


def test_gates_are_the_layers_and_skip_attention_layers():
  tokens, _ = examples()
  m = model()
  gates = gate_probe.layer_gates(m, jnp.asarray(tokens))
  assert len(gates) == 1  # layer 1 is softmax attention
  s, g = gates[0]
  assert s.shape == g.shape == (3, T, 2, 5)
  assert np.all(g <= 0) and np.allclose(s, 1 - np.exp(g), atol=1e-6)  # GSA ties the write to the forgetting
  x = m.blocks[0].mixer_norm(m.embed(jnp.asarray(tokens)))
  f = np.asarray(m.blocks[0].mixer.f_proj(x), np.float64).reshape(3, T, 2, 5)
  np.testing.assert_allclose(g, np.log(1 / (1 + np.exp(-f))) / m.config.gate_logit_normalizer, rtol=1e-5, atol=1e-6)


def test_retained_fraction_matches_a_step_by_step_product():
  rng = np.random.default_rng(0)
  tokens, query = examples(2)
  g = -rng.exponential(0.3, size=(2, T, 2, 5))
  s = rng.uniform(0.1, 1.0, size=g.shape)
  kept = gate_probe.retained_fraction(s, g, tokens, query, KV)
  expected = []
  for b, q in zip(*np.nonzero(query)):
    p = 2 * list(tokens[b, 0:2 * KV:2]).index(tokens[b, q]) + 1
    survival = np.ones((2, 5))
    for t in range(p + 1, q + 1):
      survival *= np.exp(g[b, t])
    expected.append(np.mean([np.dot(s[b, p, h], survival[h]) / s[b, p, h].sum() for h in range(2)]))
  np.testing.assert_allclose(kept, expected, rtol=1e-10)
  assert len(kept) == 2 * KV


@pytest.mark.parametrize("forget_gate", [True, False])
def test_probe_keeps_everything_without_the_forget_gate(forget_gate):
  tokens, query = examples()
  (layer,) = gate_probe.probe(model(forget_gate=forget_gate), tokens, query, KV)
  alphas = [layer[f"alpha_{r}"] for r in gate_probe.ROLES]
  if forget_gate:
    assert max(alphas) < 1 and layer["retained_mean"] < 1
  else:
    assert alphas == [1.0] * 4 and layer["retained_mean"] == pytest.approx(1.0)
  assert 0 < layer["retained_q25"] <= layer["retained_median"] <= layer["retained_q75"] <= 1 + 1e-12
  assert "| 0 |" in gate_probe.markdown([layer])
