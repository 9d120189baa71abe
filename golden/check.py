"""`python -m golden check`: run an implementation on a golden's weights and tokens, compare, report.

The implementation is any callable of the trace protocol (README, "Bring your own
implementation"):

    fn(tokens, weights, config, trace) -> None | logits

tokens: int64 (seq,); weights: Meta-named, Meta-layout tensors in the dtype under test;
config: impl.config.ModelConfig; trace(name, tensor): call it for every stage you compute, with
the names and layouts of impl.stages. impl's own forward is the default.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from golden import compare as cmp
from golden.format import MANIFEST, Golden, GoldenError, check_same_model, load_golden
from impl import stages
from impl.errors import Llama3GoldenError

DEFAULT_GOLDEN = Path(__file__).parent / "data" / "tiny"
Implementation = Callable[..., object]


class ImplementationError(Llama3GoldenError):
    """`--impl module:callable` that cannot be imported, or that raised while running."""


def impl_forward(tokens: torch.Tensor, weights, config, trace) -> torch.Tensor:
    """impl's forward in the trace protocol."""
    from impl.model import forward

    return forward(tokens, weights, config, trace=trace)


def load_callable(spec: str | None) -> Implementation:
    """'package.module:function' -> the function. None -> impl's own forward."""
    if spec is None:
        return impl_forward
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ImplementationError(f"--impl {spec!r}: expected module:callable, e.g. my_llama:forward")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the user's module: any import error is theirs to see in one line
        raise ImplementationError(
            f"--impl {spec!r}: cannot import {module_name} ({e.__class__.__name__}: {e})") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ImplementationError(f"--impl {spec!r}: {module_name} has no attribute {attr}")
    if not callable(fn):
        raise ImplementationError(f"--impl {spec!r}: {attr} is not callable")
    return fn


def golden_set(path: str | Path | None) -> list[Golden]:
    """A golden folder, or a folder of them (e.g. golden/data/tiny with fp32/ and bf16/)."""
    path = Path(path) if path is not None else DEFAULT_GOLDEN
    if (path / MANIFEST).is_file():
        return [load_golden(path)]
    if path.is_dir():
        subs = sorted(p for p in path.iterdir() if (p / MANIFEST).is_file())
        if subs:
            return [load_golden(p) for p in subs]
    raise GoldenError(f"{path}: not a golden folder (no {MANIFEST} in it or in its subfolders)")


def companion_fp32(golden: Golden, candidates: list[Golden]) -> Golden | None:
    """The fp32 golden of the same model and prompt: the truth that a bf16 run is judged against."""
    for g in candidates:
        if g.dtype == "fp32" and g.tokens == golden.tokens and g.weights_sha256 == golden.weights_sha256:
            return g
    siblings = [p for p in golden.path.parent.iterdir() if p != golden.path and (p / MANIFEST).is_file()]
    for p in siblings:
        g = load_golden(p)
        if g.dtype == "fp32" and g.tokens == golden.tokens and g.weights_sha256 == golden.weights_sha256:
            return g
    return None


def load_model_for(golden: Golden, dtype: torch.dtype):
    """impl's loader on the golden's model, verified to be the model the golden was recorded for."""
    from impl.weights import load_checkpoint, sha256_of_weights

    # As stored (dtype None), like the recorder: the same digest, and no fp32 copy of a bf16 checkpoint.
    ckpt = load_checkpoint(golden.model_name, dtype=None)
    check_same_model(golden, ckpt.config, sha256_of_weights(ckpt.weights), golden.model_name)
    return ckpt, {k: v.to(dtype) for k, v in ckpt.weights.items()}  # .to is a no-op where the dtype matches


def run_implementation(fn: Implementation, tokens: list[int], weights, config) -> dict[str, torch.Tensor]:
    """Call fn under the trace protocol; returns the reported stages (detached copies)."""
    seen: dict[str, torch.Tensor] = {}

    def trace(name: str, tensor: torch.Tensor) -> None:
        try:
            stages.parse(name)
        except KeyError:
            raise ImplementationError(f"the implementation reported an unknown stage {name!r}") from None
        t = torch.as_tensor(tensor).detach()
        expected = stages.expected_shape(name, config, len(tokens))
        if tuple(t.shape) == (1, *expected):  # a batch of one
            t = t[0]
        if name in ("logits", "logprobs_last") and tuple(t.shape[-2:]) == (len(tokens), *expected):
            t = t.reshape(-1, *expected)[-1]  # every position reported: the stage is the last one
        seen[name] = t.clone()

    try:
        with torch.inference_mode():
            fn(torch.tensor(tokens, dtype=torch.long), weights, config, trace)
    except Llama3GoldenError:
        raise
    except Exception as e:  # the user's code failed: say where, in one line
        raise ImplementationError(f"the implementation raised {e.__class__.__name__}: {e}") from None
    return seen


@dataclass
class Outcome:
    golden: Golden  # the golden of the checked dtype
    report: cmp.Report
    tokenizer: object = None  # what impl.tokenizer.load_tokenizer takes, for showing the next token as text


def check(path: str | Path | None = None, impl: str | None = None, dtypes: tuple[str, ...] = ("fp32", "bf16"),
          fn: Implementation | None = None) -> list[Outcome]:
    """Check an implementation against every golden of a set, fp32 first."""
    fn = fn or load_callable(impl)
    goldens = golden_set(path)
    outcomes = []
    for g in sorted(goldens, key=lambda g: g.dtype != "fp32"):
        if g.dtype not in dtypes:
            continue
        truth = g if g.dtype == "fp32" else companion_fp32(g, goldens)
        if truth is None:
            raise GoldenError(f"{g.path}: a bf16 check needs the fp32 golden of the same model and prompt beside it")
        ckpt, weights = load_model_for(g, g.torch_dtype)
        actual = run_implementation(fn, g.tokens, weights, ckpt.config)
        reference = g.tensors if g.dtype == "bf16" else None
        outcomes.append(Outcome(g, cmp.compare(truth.tensors, actual, g.dtype, reference), ckpt.tokenizer))
    if not outcomes:
        raise GoldenError(f"{path}: no golden of dtype {', '.join(dtypes)} there")
    return outcomes


# ---------------------------------------------------------------- the report
def _decode(tokenizer, token: int) -> str:
    if tokenizer is None:
        return ""
    try:
        from impl.tokenizer import load_tokenizer

        return repr(load_tokenizer(tokenizer).decode([token]))
    except Exception:  # the text is a nicety; the id is the fact
        return ""


def format_report(o: Outcome) -> str:
    r, g = o.report, o.golden
    m = g.manifest
    lines = [f"{g.path}: {g.model_name}, {g.dtype}, {len(g.tokens)} tokens, attention {m['attn_implementation']}, "
             f"transformers {m.get('versions', {}).get('transformers', '?')}",
             f"  {'stage':<14}{'checked':>9}  {'worst rel':>9} {'at':>4}  {'limit':>8}  result"]
    by_stage: dict[str, list[cmp.StageResult]] = {}
    for res in r.results:
        by_stage.setdefault(res.stage, []).append(res)
    for stage, rows in by_stage.items():
        checked = [x for x in rows if x.status != cmp.NOT_CHECKED]
        if not checked:
            lines.append(f"  {stage:<14}{'0/' + str(len(rows)):>9}  {'':>9} {'':>4}  {'':>8}  not checked")
            continue
        worst = max(checked, key=lambda x: x.metrics.rel / x.limit if x.limit > 0 else math.inf * (x.metrics.rel > 0))
        at = f"L{worst.layer:02d}" if worst.layer is not None else "-"
        bad = [x for x in checked if x.status != cmp.PASS]
        status = "pass" if not bad else f"{len(bad)} fail" + (" (first)" if any(x.status == cmp.FAIL for x in bad)
                                                               else "")
        if len(checked) < len(rows):
            status += f", {len(rows) - len(checked)} not checked"
        lines.append(f"  {stage:<14}{f'{len(checked)}/{len(rows)}':>9}  {cmp.sci(worst.metrics.rel):>9} {at:>4}  "
                     f"{cmp.sci(worst.limit):>8}  {status}")
    first = r.first_failure
    if first is not None:
        lines.append(f"  FIRST FAILURE: {first.describe()}")
        if first.ref_metrics is not None:
            lines.append(f"    (the reference's own bf16 error there: rel {cmp.sci(first.ref_metrics.rel)})")
    if r.logits is not None:
        lg = r.logits
        lines.append(f"  logits: KL {cmp.sci(lg.kl)} (limit {cmp.sci(lg.kl_limit)}), next token: impl {lg.top1} "
                     f"{_decode(o.tokenizer, lg.top1)}, golden {lg.top1_golden} "
                     f"{_decode(o.tokenizer, lg.top1_golden)} -> {'agree' if lg.top1_ok else 'DISAGREE'}")
    checked = r.checked
    n_pass = sum(x.status == cmp.PASS for x in checked)
    verdict = "PASS" if r.passed else "FAIL"
    lines.append(f"  {verdict}: {n_pass}/{len(checked)} stages within tolerance"
                 + (f", {len(r.results) - len(checked)} not checked (not reported)" if len(checked) < len(r.results)
                    else ""))
    return "\n".join(lines)


def write_json(outcomes: list[Outcome], file: str | Path) -> None:
    data = [{"golden": str(o.golden.path), "model": o.golden.model_name, **o.report.to_dict()} for o in outcomes]
    Path(file).write_text(json.dumps(data, indent=1) + "\n")


def plot(outcomes: list[Outcome], file: str | Path) -> None:
    """Relative error against layer for each stage, one panel per dtype (fp32 and bf16 side by side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(outcomes), figsize=(7 * len(outcomes), 5), squeeze=False, sharey=True)
    for ax, o in zip(axes[0], outcomes, strict=True):
        for stage in stages.LAYER_STAGES:
            rows = [x for x in o.report.results if x.stage == stage and x.metrics is not None]
            if rows:
                ax.plot([x.layer for x in rows], [max(x.metrics.rel, 1e-12) for x in rows], marker=".", label=stage,
                        linewidth=1)
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_title(f"{o.golden.model_name} {o.golden.dtype}: impl vs fp32 golden")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("relative error")
    axes[0][-1].legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)
