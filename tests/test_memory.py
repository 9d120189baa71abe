"""Peak resident memory of a bf16 forward through one Llama-3-8B-shaped layer, extrapolated to the model.

The walk-through runs Llama-3-8B in bf16 within 17 GB. A subprocess (a fresh heap, nothing else resident)
builds one 8B layer in bf16, runs the walk-through's 17-token prompt through the fast forward's block twice, and
reads VmRSS / VmHWM from /proc/self/status, resetting the peak (clear_refs 5) before each forward. The
whole model is then 32 such layers + the embedding + the output matrix + the runtime + the worst forward.
The forward's own increment must stay below the size of an fp32 copy of the smallest weight matrix, so
no fp32 copy of a whole matrix (or a bf16 copy of a big one) can hide in the hot path.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from impl.config import PRESETS

ROOT = Path(__file__).resolve().parents[1]
SEQ = 17  # the walk-through's prompt
LIMIT = 17e9  # bytes: the walk-through's "17 GB" (decimal)

SCRIPT = r"""
import json, sys
import torch
from impl import model
from impl.config import PRESETS

def status(key):  # bytes
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

def reset_peak():  # VmHWM := VmRSS (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

def layer(c):  # filled, so every page is resident; the values do not matter for memory
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    shapes = {"attention_norm.weight": (c.dim,), "ffn_norm.weight": (c.dim,),
              "attention.wq.weight": (q, c.dim), "attention.wk.weight": (kv, c.dim),
              "attention.wv.weight": (kv, c.dim), "attention.wo.weight": (c.dim, q),
              "feed_forward.w1.weight": (c.hidden_dim, c.dim), "feed_forward.w2.weight": (c.dim, c.hidden_dim),
              "feed_forward.w3.weight": (c.hidden_dim, c.dim)}
    return {f"layers.0.{k}": torch.empty(s, dtype=torch.bfloat16).fill_(0.01) for k, s in shapes.items()}

def run(c, w, seq):
    x = torch.randn(seq, c.dim).to(torch.bfloat16)
    with torch.inference_mode():
        return model.transformer_block_fast(x, w, 0, c, model.precompute_freqs_cis(c, seq), 0, None,
                                            model.choose_engines(w, c, seq))

seq = int(sys.argv[1])
big = PRESETS["llama-3-8b"].replace(n_layers=1)
small = PRESETS["tiny"].replace(n_layers=1)
run(small, layer(small), seq)  # load the kernels' code and caches first: they are the runtime's, not the layer's
base = status("VmRSS")
w = layer(big)
loaded = status("VmRSS")
peaks = []
for _ in range(2):
    reset_peak()
    run(big, w, seq)
    peaks.append(status("VmHWM"))
print(json.dumps({"base": base, "loaded": loaded, "peaks": peaks,
                  "layer_bytes": sum(t.numel() * t.element_size() for t in w.values())}))
"""


@pytest.fixture(scope="module")
def measured() -> dict:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc (VmHWM reset through clear_refs)")
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(SEQ)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def test_memory_forward_makes_no_copy_of_a_weight_matrix(measured):
    c = PRESETS["llama-3-8b"]
    smallest_fp32_matrix = c.n_kv_heads * c.head_dim * c.dim * 4  # wk in fp32: 16.8 MB
    increment = max(measured["peaks"]) - measured["loaded"]
    assert increment < smallest_fp32_matrix, (
        f"a {SEQ}-token bf16 forward through one 8B layer grew the peak by {_mb(increment)}, more than an fp32 "
        f"copy of wk ({_mb(smallest_fp32_matrix)}): something copies or upcasts a whole weight matrix")


def test_memory_layer_peak_within_weights_and_activations(measured):
    c = PRESETS["llama-3-8b"]
    activations = 8 * SEQ * c.hidden_dim * 4  # a handful of (seq, hidden) fp32 temporaries, generously
    peak = max(measured["peaks"]) - measured["base"]
    budget = 1.2 * measured["layer_bytes"] + activations
    assert peak < budget, f"one layer's peak {_mb(peak)} over 1.2x its bf16 weights + activations ({_mb(budget)})"


def test_memory_llama3_8b_bf16_extrapolates_within_17_gb(measured):
    c = PRESETS["llama-3-8b"]
    per_layer = measured["loaded"] - measured["base"]
    embeddings = 2 * c.vocab_size * c.dim * 2  # tok_embeddings + output, bf16
    logits = c.vocab_size * 4 * 2  # the last position's logits and log-softmax, fp32
    forward = max(measured["peaks"]) - measured["loaded"]
    total = measured["base"] + c.n_layers * per_layer + embeddings + forward + logits
    assert total < LIMIT, (
        f"Llama-3-8B bf16 extrapolates to {total / 1e9:.2f} GB ({measured['base'] / 1e9:.2f} runtime + "
        f"{c.n_layers} x {per_layer / 1e9:.3f} layers + {embeddings / 1e9:.2f} embeddings/output + "
        f"{_mb(forward)} forward), over {LIMIT / 1e9:.0f} GB")
