"""The examples run and pass their own checks (training lowers the loss, cached decoding equals the full forward,
an orbax round trip keeps the logits, the layer works inside Linen), so the README's example cannot rot."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gsa_in_your_own_model():
  result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "gsa_in_your_own_model.py")],
                          capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  assert "all checks passed" in result.stdout
