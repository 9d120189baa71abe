"""Long prompts with sampled goldens (golden.sampling): the numbers of the README's "Long prompts" table.

    python -m benchmarks.long_prompts smollm2 18 129 513 1025     # golden size, record and check time per length
    python -m benchmarks.long_prompts overhead 1024 2048 4096 8192  # what the checker adds to impl's own forward

`smollm2`: records SmolLM2-135M in fp32 on the first N tokens of golden.record.LONG_PROMPT (the recorder's
capture, so any N), writes the golden, reloads it and checks impl against it through the Python API.
`overhead`: on `tiny-long` (2 layers), impl's plain forward against the same forward under `check_golden` (golden
loaded beforehand), so the difference is the checker's own work: normalising, sampling, summarising, comparing.
Times are wall clock and process CPU (both cores), best of `--repeat`; on a loaded machine trust the CPU column.
Not a pytest file: it records real models and takes minutes.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from golden.check import check_golden, impl_forward, load_model_for
from golden.format import ACTIVATIONS, MANIFEST, environment, load_golden, write_golden
from golden.record import DERIVED, LONG_PROMPT, capture, load_reference


def _timed(fn, repeat: int = 1):
    best = None
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        w, c = time.perf_counter() - w, time.process_time() - c
        best = (w, c, out) if best is None or w < best[0] else best
    return best


def record_tokens(model: str, n: int, out: Path, dtype: str = "fp32") -> Path:
    """A golden of `model` on the first n tokens of LONG_PROMPT (repeated as needed), written to `out`."""
    with load_reference(model, dtype) as ref:
        ids = ref.tokenizer.encode(LONG_PROMPT, bos=True)
        while len(ids) < n:
            ids += ids[1:]
        tokens = [int(t) for t in ids[:n]]
        tensors = capture(ref.hf_model, tokens, "eager")
        manifest = {"model": {"name": model, "config": ref.config.to_dict(), "weights_sha256": ref.weights_sha256,
                              "source": ref.source},
                    "dtype": dtype, "attn_implementation": "eager", "prompt": f"the first {n} tokens of LONG_PROMPT",
                    "tokens": tokens, "derived": list(DERIVED["eager"]), "versions": environment()}
        return write_golden(out, manifest, tensors)


def smollm2(lengths: list[int], repeat: int) -> None:
    print("| prompt tokens | golden size | record (wall / CPU) | check (wall / CPU) | verdict |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in lengths:
            folder = Path(tmp) / str(n)
            rw, rc, _ = _timed(lambda n=n, folder=folder: record_tokens("smollm2-135m", n, folder))
            size = sum((folder / f).stat().st_size for f in (MANIFEST, ACTIVATIONS))
            g = load_golden(folder)
            ckpt, weights = load_model_for(g, g.torch_dtype)
            cw, cc, report = _timed(lambda g=g, c=ckpt, w=weights: check_golden(impl_forward, g, g, c.config, w),
                                    repeat)
            print(f"| {n:,} | {size / 1e6:.1f} MB | {rw:.1f} s / {rc:.1f} s | {cw:.1f} s / {cc:.1f} s | "
                  f"{report.verdict} |", flush=True)


def overhead(lengths: list[int], repeat: int) -> None:
    print("| prompt tokens | impl forward (wall / CPU) | check (wall / CPU) | checker adds (wall / CPU) "
          "| CPU added per token |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in lengths:
            g = load_golden(record_tokens("tiny-long", n, Path(tmp) / str(n)))
            ckpt, weights = load_model_for(g, g.torch_dtype)
            tokens = torch.tensor(g.tokens)

            def plain(ckpt=ckpt, weights=weights, tokens=tokens):
                with torch.inference_mode():
                    return impl_forward(tokens, {k: v.clone() for k, v in weights.items()}, ckpt.config,
                                        lambda k, t: None)

            fw, fc, _ = _timed(plain, repeat)
            cw, cc, report = _timed(lambda g=g, c=ckpt, w=weights: check_golden(impl_forward, g, g, c.config, w),
                                    repeat)
            print(f"| {n:,} | {fw:.2f} s / {fc:.2f} s | {cw:.2f} s / {cc:.2f} s | {cw - fw:.2f} s / {cc - fc:.2f} s | "
                  f"{(cc - fc) / n * 1e3:.2f} ms ({report.verdict}) |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("smollm2", "overhead"))
    p.add_argument("lengths", type=int, nargs="+")
    p.add_argument("--repeat", type=int, default=1)
    a = p.parse_args()
    (smollm2 if a.what == "smollm2" else overhead)(a.lengths, a.repeat)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
