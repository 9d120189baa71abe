"""The runner: run an implementation on a golden's weights and tokens and compare (`check`), or compare
two goldens (`diff_goldens`). It computes; golden.report renders what it found; golden.cli wires arguments.

The implementation is any callable of the trace protocol (README, "Bring your own
implementation"):

    fn(tokens, weights, config, trace) -> None | logits

tokens: int64 (seq,); weights: Meta-named, Meta-layout tensors in the dtype under test;
config: impl.config.ModelConfig; trace(name, tensor): call it for every stage you compute, with
the names and layouts of impl.stages. impl's own forward is the default.

A bf16 run is judged against the fp32 golden of the same model and prompt (its "truth"), with the
reference's own bf16 golden saying how much bf16 error is fair (golden.compare).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain
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


# ---------------------------------------------------------------- the implementation
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


# ---------------------------------------------------------------- the goldens
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


def _is_truth_of(candidate: Golden, golden: Golden) -> bool:
    return (candidate.dtype == "fp32" and candidate.tokens == golden.tokens
            and candidate.weights_sha256 == golden.weights_sha256)


def _siblings(golden: Golden) -> Iterator[Golden]:
    """The goldens beside this one (tiny/bf16 -> tiny/fp32), loaded one at a time as they are asked for."""
    for p in sorted(golden.path.parent.iterdir()):
        if p != golden.path and (p / MANIFEST).is_file():
            yield load_golden(p)


def fp32_truth(golden: Golden, loaded: list[Golden]) -> Golden | None:
    """The fp32 golden of the same model and prompt: the truth that a bf16 run is judged against.

    Taken from the goldens already loaded; a golden given alone (a folder like tiny/bf16) finds it
    among its sibling folders.
    """
    candidates = chain(loaded, _siblings(golden)) if loaded == [golden] else loaded
    return next((g for g in candidates if _is_truth_of(g, golden)), None)


# ---------------------------------------------------------------- running
def load_model_for(golden: Golden, dtype: torch.dtype):
    """impl's loader on the golden's model, verified to be the model the golden was recorded for."""
    from impl.weights import load_checkpoint, sha256_of_weights

    # As stored (dtype None), like the recorder: the same digest, and no fp32 copy of a bf16 checkpoint.
    ckpt = load_checkpoint(golden.model_name, dtype=None)
    check_same_model(golden, ckpt.config, sha256_of_weights(ckpt.weights), golden.model_name)
    return ckpt, {k: v.to(dtype) for k, v in ckpt.weights.items()}  # .to is a no-op where the dtype matches


def _normalise(name: str, tensor, config, seq: int) -> torch.Tensor:
    """One reported stage as the golden holds it: a known name, no batch dim of 1, logits of the last position."""
    try:
        stages.parse(name)
    except KeyError:
        raise ImplementationError(f"the implementation reported an unknown stage {name!r}") from None
    t = torch.as_tensor(tensor).detach()
    expected = stages.expected_shape(name, config, seq)
    if tuple(t.shape) == (1, *expected):  # a batch of one
        t = t[0]
    if name in ("logits", "logprobs_last") and tuple(t.shape[-2:]) == (seq, *expected):
        t = t.reshape(-1, *expected)[-1]  # every position reported: the stage is the last one
    return t.clone()


def run_implementation(fn: Implementation, tokens: list[int], weights, config) -> dict[str, torch.Tensor]:
    """Call fn under the trace protocol; returns the reported stages (detached copies)."""
    seen: dict[str, torch.Tensor] = {}

    def trace(name: str, tensor: torch.Tensor) -> None:
        seen[name] = _normalise(name, tensor, config, len(tokens))

    try:
        with torch.inference_mode():
            fn(torch.tensor(tokens, dtype=torch.long), weights, config, trace)
    except Llama3GoldenError:
        raise
    except Exception as e:  # the user's code failed: say where, in one line
        raise ImplementationError(f"the implementation raised {e.__class__.__name__}: {e}") from None
    return seen


def check_golden(fn: Implementation, golden: Golden, truth: Golden, config, weights) -> cmp.Report:
    """Run fn on the golden's tokens and compare every stage with the fp32 truth.

    bf16: the reference's own bf16 error (golden against truth) sets each stage's limit.
    """
    actual = run_implementation(fn, golden.tokens, weights, config)
    reference = golden.tensors if golden.dtype == "bf16" else None
    report = cmp.compare(truth.tensors, actual, golden.dtype, reference)
    first = report.first_failure
    if first is not None:  # say why, not only where (golden.diagnose): the first failing stage only
        from golden.diagnose import diagnose

        first.diagnosis = diagnose(first.key, actual, truth.tensors, config, weights, first.limit)
    return report


# ---------------------------------------------------------------- check
@dataclass
class Outcome:
    golden: Golden  # the golden of the checked dtype
    report: cmp.Report
    tokenizer: object = None  # a loaded impl.tokenizer.Tokenizer, for showing the next token as text
    impl: str = "impl"  # the implementation checked, as the user named it (--impl), for titles


def _load_tokenizer(spec):
    """The checkpoint's tokenizer, loaded once for a report; None where there is none (the ids are the fact)."""
    if spec is None:
        return None
    try:
        from impl.tokenizer import load_tokenizer

        return load_tokenizer(spec)
    except Exception:  # the text is a nicety: a tokenizer that does not load only costs the report its text
        return None


def check(path: str | Path | None = None, impl: str | None = None, dtypes: tuple[str, ...] = ("fp32", "bf16"),
          fn: Implementation | None = None) -> list[Outcome]:
    """Check an implementation against every golden of a set, fp32 first."""
    fn = fn or load_callable(impl)
    goldens = golden_set(path)
    tokenizers: dict[object, object] = {}  # tokenizer spec -> loaded tokenizer: one load per spec
    outcomes = []
    for g in sorted(goldens, key=lambda g: g.dtype != "fp32"):
        if g.dtype not in dtypes:
            continue
        truth = g if g.dtype == "fp32" else fp32_truth(g, goldens)
        if truth is None:
            raise GoldenError(f"{g.path}: a bf16 check needs the fp32 golden of the same model and prompt beside it")
        ckpt, weights = load_model_for(g, g.torch_dtype)
        report = check_golden(fn, g, truth, ckpt.config, weights)
        if ckpt.tokenizer not in tokenizers:
            tokenizers[ckpt.tokenizer] = _load_tokenizer(ckpt.tokenizer)
        outcomes.append(Outcome(g, report, tokenizers[ckpt.tokenizer], impl or "impl"))
    if not outcomes:
        raise GoldenError(f"{path}: no golden of dtype {', '.join(dtypes)} there")
    return outcomes


# ---------------------------------------------------------------- diff
def diff_goldens(a: Golden, b: Golden) -> cmp.Report:
    """Stage by stage, b against a (a is "expected"), with the suite's metrics.

    fp32: the suite's fp32 tolerance table. bf16: `tolerances.DIFF_BF16_REL` for every stage
    (two bf16 recordings of one model, e.g. before and after an upgrade).
    """
    check_same_model(b, a.config, a.weights_sha256, name=f"{a.model_name} of {a.path}")
    if a.tokens != b.tokens:
        raise GoldenError(f"{b.path}: recorded on other tokens than {a.path} ({len(b.tokens)} vs {len(a.tokens)} "
                          f"tokens); goldens of different prompts cannot be diffed")
    if a.dtype != b.dtype:
        raise GoldenError(f"{b.path}: dtype {b.dtype}, {a.path} is {a.dtype}; diff compares goldens of one dtype")
    return cmp.compare_goldens(a.tensors, b.tensors, a.dtype)


@dataclass
class Diff:
    a: Golden  # expected
    b: Golden  # compared against a
    report: cmp.Report


def diff(a: str | Path, b: str | Path) -> Diff:
    """Load two golden folders and diff b against a."""
    ga, gb = load_golden(a), load_golden(b)
    return Diff(ga, gb, diff_goldens(ga, gb))
