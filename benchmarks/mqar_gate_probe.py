"""How a model trained on MQAR uses GSA's forget gate: gate statistics by token role, per GSA layer.

    python benchmarks/mqar_gate_probe.py --run runs/mqar_gsa             # a train.py run directory on MQAR
    python benchmarks/mqar_gate_probe.py --run RUN --examples 512 --json probe.json

On held-out MQAR examples of the run's own task (length, pairs, vocabulary), for every GSA layer, averaged over
slots and heads:
  - alpha = exp(g), the fraction of each slot kept at a token, and s, the strength with which the token writes it,
    at the four token roles: keys and values (the pairs at the start), queries, and the random filler between them;
  - retained: the fraction of a pair's write still in the slots when its key is queried. At the pair's value token
    (where the short convolution has brought its key in) slot m is written with strength s_m; by the query that
    write has been scaled by prod alpha_m over the tokens in between. retained = sum_m s_m * survival_m / sum_m s_m,
    averaged over heads and queries. 1 for the no-gate ablation (alpha = 1) by construction.

GSA ties writing to forgetting (s = 1 - alpha): a slot is written only as strongly as it is cleared. MQAR asks for
every pair, so a GSA model has to learn to keep alpha near 1 at the filler tokens; the ablation keeps everything
from the start (docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np

from gsa_jax.data.mqar import mqar_example
from gsa_jax.layers import GatedSlotAttention
from gsa_jax.run_dir import load_model

ROLES = ("key", "value", "query", "filler")


def token_roles(tokens: np.ndarray, num_kv_pairs: int, query_mask: np.ndarray) -> np.ndarray:
  """[b, t] int: the index in ROLES of each token's role in its MQAR example."""
  roles = np.full(tokens.shape, ROLES.index("filler"))
  roles[:, 0:2 * num_kv_pairs:2] = ROLES.index("key")
  roles[:, 1:2 * num_kv_pairs:2] = ROLES.index("value")
  roles[query_mask] = ROLES.index("query")
  return roles


def layer_gates(model, tokens: jax.Array) -> list[tuple[np.ndarray, np.ndarray]]:
  """(s, g) of every GSA layer, each float32 [b, t, heads, slots], from the layer's own gate code."""
  out = []
  x = model.embed(tokens)
  for block in model.blocks:
    if isinstance(block.mixer, GatedSlotAttention):
      s, g = block.mixer.gates(block.mixer.f_proj(block.mixer_norm(x)))
      out.append((np.asarray(s, np.float64), np.asarray(g, np.float64)))
    x = block(x)
  return out


def retained_fraction(s: np.ndarray, g: np.ndarray, tokens: np.ndarray, query_mask: np.ndarray,
                      num_kv_pairs: int) -> np.ndarray:
  """Per query (flattened over the batch): the share of its pair's write still in the slots at the query, averaged
  over heads. s, g [b, t, h, m]; tokens [b, t]; query_mask [b, t] bool."""
  cum = np.cumsum(g, axis=1)  # float64: the differences below lose nothing that matters at these lengths
  out = []
  for b, q in zip(*np.nonzero(query_mask)):
    pair = int(np.nonzero(tokens[b, 0:2 * num_kv_pairs:2] == tokens[b, q])[0][0])
    p = 2 * pair + 1  # the value token
    survival = np.exp(cum[b, q] - cum[b, p])  # [h, m]
    write = s[b, p]
    out.append(np.mean(np.sum(write * survival, -1) / np.maximum(np.sum(write, -1), 1e-30)))
  return np.asarray(out)


def probe(model, tokens: np.ndarray, query_mask: np.ndarray, num_kv_pairs: int) -> list[dict]:
  """One dict per GSA layer: mean alpha and s per role, and the retained fraction (mean, quartiles)."""
  roles = token_roles(tokens, num_kv_pairs, query_mask)
  results = []
  for s, g in layer_gates(model, jax.numpy.asarray(tokens)):
    alpha = np.exp(g)
    row = {f"alpha_{r}": float(alpha[roles == i].mean()) for i, r in enumerate(ROLES)}
    row |= {f"s_{r}": float(s[roles == i].mean()) for i, r in enumerate(ROLES)}
    kept = retained_fraction(s, g, tokens, query_mask, num_kv_pairs)
    row |= {"retained_mean": float(kept.mean()), "retained_q25": float(np.quantile(kept, 0.25)),
            "retained_median": float(np.median(kept)), "retained_q75": float(np.quantile(kept, 0.75))}
    results.append(row)
  return results


def mqar_tokens(config, num_examples: int) -> tuple[np.ndarray, np.ndarray]:
  """Held-out examples of the run's MQAR task: tokens [n, t] and the query mask [n, t]."""
  d = config.data
  examples = [mqar_example(i, seed=config.train.seed, split="eval", seq_len=config.train.seq_len,
                           vocab_size=d.mqar_vocab_size, num_kv_pairs=d.mqar_num_kv_pairs, power_a=d.mqar_power_a,
                           random_non_queries=d.mqar_random_non_queries) for i in range(num_examples)]
  return (np.stack([e["tokens"] for e in examples]), np.stack([e["loss_mask"] for e in examples]) > 0)


def markdown(results: list[dict]) -> str:
  lines = ["| layer | " + " | ".join(f"alpha {r}" for r in ROLES) + " | " + " | ".join(f"s {r}" for r in ROLES)
           + " | retained: mean [q25, median, q75] |", "|" + "---|" * (2 + 2 * len(ROLES))]
  for i, r in enumerate(results):
    lines.append(f"| {i} | " + " | ".join(f"{r['alpha_' + x]:.3f}" for x in ROLES) + " | "
                 + " | ".join(f"{r['s_' + x]:.3f}" for x in ROLES)
                 + f" | {r['retained_mean']:.3f} [{r['retained_q25']:.3f}, {r['retained_median']:.3f}, "
                 f"{r['retained_q75']:.3f}] |")
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--run", required=True, help="a train.py run directory (config.json and checkpoints/)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  p.add_argument("--examples", type=int, default=256, help="held-out examples to average over")
  p.add_argument("--json", default=None, help="also write the results here")
  a = p.parse_args(argv)
  try:
    model, config, step = load_model(a.run, a.step, dtype="float32", backend="chunked")
  except FileNotFoundError as e:  # not a run directory, or no such checkpoint step
    p.error(str(e))
  if config.data.source != "mqar":
    sys.exit(f"--run {a.run}: trained on data.source={config.data.source!r}; this probe needs an MQAR run")
  if not any(isinstance(b.mixer, GatedSlotAttention) for b in model.blocks):
    sys.exit(f"--run {a.run}: the model has no GSA layer")
  tokens, query_mask = mqar_tokens(config, a.examples)
  results = probe(model, tokens, query_mask, config.data.mqar_num_kv_pairs)
  print(f"{a.run} step {step}: L = {config.train.seq_len}, {config.data.mqar_num_kv_pairs} pairs, "
        f"forget_gate={config.model.forget_gate}, {a.examples} held-out examples\n")
  print(markdown(results))
  if a.json:
    with open(a.json, "w") as f:
      json.dump({"run": a.run, "step": step, "layers": results}, f, indent=1)


if __name__ == "__main__":
  main()
