"""The runner: run an implementation on a golden's weights and tokens and compare (`check`), or compare
two goldens (`diff_goldens`). It computes; golden.report renders what it found; golden.cli wires arguments.

The implementation is any callable of the trace protocol (README, "Bring your own
implementation"):

    fn(tokens, weights, config, trace) -> None | logits

tokens: int64 (seq,); weights: Meta-named, Meta-layout tensors in the dtype under test;
config: impl.config.ModelConfig; trace(name, tensor): call it for every stage you compute, with
the names and layouts of impl.stages. impl's own forward is the default.

An implementation that also takes `start_pos` and `cache` follows the decode protocol (README, "Checking
decoding"): fn(tokens, weights, config, trace, start_pos=0, cache=None) -> (logits, cache). The check calls it
with the prompt, then once per decode step with the golden's next token and the cache it returned, and compares
every step's stages (golden.decode); one without them is checked on the prefill and told decode did not run.

A bf16 run is judged against the fp32 golden of the same model and prompt (its "truth"), with the
reference's own bf16 golden saying how much bf16 error is fair (golden.compare).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch

from golden import compare as cmp
from golden.decode import DecodeReport, check_same_plan, check_steps, diff_steps, not_run, plan_of, why_not_run
from golden.format import MANIFEST, Golden, GoldenError, check_same_model, dtype_name, load_golden
from golden.sampling import Sampled
from impl import stages
from impl.errors import Llama3GoldenError

DATA = Path(__file__).parent / "data"
# The main job's default set (`python -m golden check` with no folder), fp32 and bf16 of each. Together they
# leave none of the 8B's literal constants right by chance (README, "The default goldens"): `tiny` is the
# walk-through's shape and prompt; `tiny-varied` has GQA group 3, theta 10000, eps 1e-6, a padded vocabulary of
# 128512 and an 11-token prompt; `tiny-scaled` Llama 3.1 rope scaling with a frequency in each band;
# `tiny-tied` tied embeddings as in Llama 3.2.
DEFAULT_SET = ("tiny", "tiny-varied", "tiny-scaled", "tiny-tied")
DEFAULT_GOLDEN = DATA / "tiny"  # the walk-through's golden (its prompt and the 8B's constants)
Implementation = Callable[..., object]


class ImplementationError(Llama3GoldenError):
    """`--impl module:callable` that cannot be imported, or that raised while running.

    Raised while running, it says how far the run got: `traced`, the stages reported before it happened, and
    `stage`, the stage a bad trace call named (None for a crash): pytest --impl fails that stage's test.
    """

    traced: tuple[str, ...] = ()
    stage: str | None = None


# ---------------------------------------------------------------- the implementation
def impl_forward(tokens: torch.Tensor, weights, config, trace, start_pos: int = 0, cache=None):
    """impl's reference forward in the trace protocol, with a KV cache (the decode protocol): -> (the last
    position's logits, the cache, grown where the next tokens need room)."""
    from impl.model import KVCache, forward

    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    cache = KVCache.with_room(cache, config, start_pos + tokens.shape[0], weights["tok_embeddings.weight"].dtype)
    return forward(tokens, weights, config, trace=trace, start_pos=start_pos, cache=cache, all_logits=False), cache


def load_callable(spec: str | None, option: str = "--impl") -> Implementation:
    """'package.module:function' or 'path/to/file.py:function' -> the function. None -> impl's own forward.

    A file (a notebook export, a script beside no package) is loaded by its path; its folder is appended to
    sys.path so that it can import the modules beside it, as `python file.py` could. `option` names the option
    in messages (--impl, --impl-tokenizer).
    """
    if spec is None:
        return impl_forward
    where, sep, attr = spec.rpartition(":")  # rpartition: a Windows path has a colon of its own
    if not sep or not where or not attr:
        raise ImplementationError(f"{option} {spec!r}: expected module:callable or path/to/file.py:callable, "
                                  f"e.g. my_llama:forward")
    module = _load_file(spec, Path(where), option) if _is_file(where) else _import(spec, where, option)
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ImplementationError(f"{option} {spec!r}: {where} has no attribute {attr}")
    if not callable(fn):
        raise ImplementationError(f"{option} {spec!r}: {attr} is not callable")
    return fn


def _is_file(where: str) -> bool:
    return where.endswith(".py") or "/" in where or os.sep in where


def _import(spec: str, module_name: str, option: str):
    try:
        return importlib.import_module(module_name)
    except Exception as e:  # the user's module: any import error is theirs to see in one line
        missing = isinstance(e, ModuleNotFoundError) and e.name is not None and (
            module_name == e.name or module_name.startswith(e.name + "."))
        hint = (f"; run from the folder that holds it, or give its file: path/to/{module_name.rpartition('.')[2]}.py:"
                f"{spec.rpartition(':')[2]}" if missing else "")
        raise ImplementationError(f"{option} {spec!r}: cannot import {module_name} ({e.__class__.__name__}: "
                                  f"{_first_line(e)}){hint}") from None


def _load_file(spec: str, path: Path, option: str):
    """A module from a .py file, under a name of its own (a file called impl.py or golden.py shadows nothing)."""
    if not path.is_file():
        raise ImplementationError(f"{option} {spec!r}: no file {path}")
    if path.suffix != ".py":
        raise ImplementationError(f"{option} {spec!r}: {path} is not a .py file")
    path = path.resolve()
    name = f"_llama3_golden_impl_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader_spec)
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    sys.modules[name] = module  # before running it, as an import does (dataclasses look their module up there)
    try:
        with user_code():
            loader_spec.loader.exec_module(module)
    except BaseException as e:
        del sys.modules[name]
        if isinstance(e, KeyboardInterrupt):
            raise
        raise ImplementationError(f"{option} {spec!r}: cannot import {path.name} ({e.__class__.__name__}: "
                                  f"{_first_line(e)} at {_where(e, str(path))})") from None
    return module


# ---------------------------------------------------------------- the goldens
def golden_set(path: str | Path | None) -> list[Golden]:
    """A golden folder, or a folder of them (e.g. golden/data/tiny with fp32/ and bf16/); None: DEFAULT_SET.

    Dot-folders are skipped: `.fp32.tmp-*` / `.fp32.old-*` are a writer's temp folders (golden.format).
    """
    return [load_golden(p) for p in golden_folders(path)]


def golden_folders(path: str | Path | None) -> list[Path]:
    """The golden folders golden_set loads, without loading them. A path that does not exist may name a committed
    golden: `tiny`, `tiny/fp32`, `smollm2-135m` (golden/data, shipped with the package)."""
    if path is None:
        return [p for name in DEFAULT_SET for p in golden_folders(DATA / name)]
    path = Path(path)
    if not path.exists() and not path.is_absolute() and (DATA / path).is_dir():
        path = DATA / path
    if (path / MANIFEST).is_file():
        return [path]
    if path.is_dir():
        subs = _golden_folders(path)
        if subs:
            return subs
    raise GoldenError(f"{path}: not a golden folder (no {MANIFEST} in it or in its subfolders)")


def _golden_folders(folder: Path) -> list[Path]:
    """The golden folders in folder, by name; not dot-folders (a writer's temp or old folders)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and (p / MANIFEST).is_file())


def _is_truth_of(candidate: Golden, golden: Golden) -> bool:
    # The config too: tiny and tiny-scaled share their weights and prompt, and differ only in rope scaling.
    return (candidate.dtype == "fp32" and candidate.tokens == golden.tokens
            and candidate.weights_sha256 == golden.weights_sha256
            and candidate.manifest["model"]["config"] == golden.manifest["model"]["config"])


def _rows(golden: Golden) -> list:
    """Each stage's `rows` (golden.sampling), None where it is stored in full."""
    return [e.get("rows") for e in golden.manifest["stages"]]


def _siblings(golden: Golden) -> Iterator[Golden]:
    """The goldens beside this one (tiny/bf16 -> tiny/fp32), loaded one at a time as they are asked for."""
    for p in _golden_folders(golden.path.parent):
        if p != golden.path:
            yield load_golden(p)


def fp32_truth(golden: Golden, loaded: list[Golden]) -> Golden | None:
    """The fp32 golden of the same model and prompt: the truth that a bf16 run is judged against.

    Taken from the goldens already loaded; a golden given alone (a folder like tiny/bf16) finds it
    among its sibling folders.
    """
    candidates = chain(loaded, _siblings(golden)) if loaded == [golden] else loaded
    return next((g for g in candidates if _is_truth_of(g, golden)), None)


# ---------------------------------------------------------------- the model
def _known_model(name: str) -> bool:
    """Names a golden may ask check to load on its own word: impl's presets and the fetch registry's assets
    (small, pinned, sha256-verified). Paths and Hub ids are loaded only when the user names them (--model)."""
    from impl import assets
    from impl.weights import RANDOM_PRESETS

    return name in RANDOM_PRESETS or name in assets.ASSETS


def load_model_for(golden: Golden, dtype: torch.dtype, model: str | None = None, loaded: dict | None = None):
    """impl's loader on the golden's model (or `model`, given by the user), verified to be the model the golden
    was recorded for. A golden naming a path or a Hub id is refused unless the user passes the model.

    loaded: a dict that keeps each checkpoint (and its digest) by name across calls, so that the fp32 and bf16
    goldens of one model load it once (check, pytest --impl's session)."""
    from impl.weights import load_checkpoint, sha256_of_weights

    name = golden.model_name if model is None else str(model)
    if model is None and not _known_model(name):
        raise GoldenError(f"{golden.path}: recorded for model {name[:80]!r}, which check loads only when you name it: "
                          f"pass --model NAME_OR_PATH (a preset, an asset, or your copy of that model)")
    loaded = {} if loaded is None else loaded
    if name not in loaded:
        # As stored (dtype None), like the recorder: the same digest, and no fp32 copy of a bf16 checkpoint.
        ckpt = load_checkpoint(name, dtype=None)
        loaded[name] = ckpt, sha256_of_weights(ckpt.weights)
    ckpt, digest = loaded[name]
    check_same_model(golden, ckpt.config, digest, name)
    return ckpt, {k: v.to(dtype) for k, v in ckpt.weights.items()}  # .to is a no-op where the dtype matches


# ---------------------------------------------------------------- running the user's code
COPY_LIMIT_BYTES = 4 << 30  # weights up to this size are copied per call; larger ones are verified by digest after


def _user_file(fn: Implementation) -> str | None:
    """The source file of the implementation (its function, or the module of a callable object)."""
    target = inspect.unwrap(fn) if callable(fn) else fn
    for candidate in (target, type(target)):
        try:
            return os.path.realpath(inspect.getsourcefile(candidate) or "")
        except TypeError:
            continue
    return None


class ProcessExit(BaseException):
    """os._exit(code) called by the user's code, raised in its place while that code runs (`user_code`): the real
    one ends the checker at once with the user's status, and an os._exit(0) before any verdict read as success."""

    def __init__(self, code: int = 0):
        super().__init__(code)
        self.code = code


@contextlib.contextmanager
def user_code() -> Iterator[None]:
    """While the user's code runs (its import, its calls), os._exit raises ProcessExit instead of ending the run."""
    real = os._exit

    def refused(code: int = 0) -> None:
        raise ProcessExit(code)

    os._exit = refused
    try:
        yield
    finally:
        os._exit = real


def _where(exc: BaseException, user_file: str | None) -> str:
    """`my_llama.py:23`: the innermost frame in the user's file, else the innermost frame of all."""
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if user_file and os.path.realpath(f.filename) == user_file]
    frame = (mine or frames or [None])[-1]
    if frame is None:
        return "?"
    path = frame.filename
    rel = os.path.relpath(path) if os.path.isabs(path) else path
    return f"{rel if not rel.startswith('..') else path}:{frame.lineno}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def raised_where(exc: BaseException, fn) -> str:
    """What the user's callable did and where: `raised ValueError: bad shape at my_llama.py:23`, `called
    sys.exit(1) at my_llama.py:9`."""
    what = (f"called sys.exit({exc.code!r})" if isinstance(exc, SystemExit)
            else f"called os._exit({exc.code!r})" if isinstance(exc, ProcessExit)
            else f"raised {exc.__class__.__name__}" + (f": {_first_line(exc)}" if _first_line(exc) else ""))
    return f"{what} at {_where(exc, _user_file(fn))}"


def _as_stage_tensor(name: str, tensor) -> torch.Tensor:
    """A reported value as a plain dense real tensor on the CPU, or ImplementationError saying what it is."""
    if isinstance(tensor, torch.Tensor):
        t = tensor
    else:
        try:
            t = torch.as_tensor(tensor)
        except Exception:
            raise ImplementationError(f"reported {name} as a {type(tensor).__name__}, not a tensor") from None
    if t.is_meta:
        raise ImplementationError(f"reported {name} as a meta tensor (it holds no data): report the computed tensor")
    if t.layout != torch.strided:
        raise ImplementationError(f"reported {name} as a {t.layout} tensor: report a dense one (x.to_dense())")
    if t.is_complex():
        raise ImplementationError(f"reported {name} as a complex tensor ({dtype_name(t.dtype)}): report real values "
                                  f"(interleaved pairs: torch.view_as_real(x).flatten(-2))")
    if t.dtype == torch.bool or t.is_quantized:
        raise ImplementationError(f"reported {name} as a {dtype_name(t.dtype)} tensor: report numbers")
    return t.detach().cpu()


def _normalise(name, tensor, config, seq: int, seen, kv_len: int | None = None, copy: bool = True) -> torch.Tensor:
    """One reported stage as the golden holds it: a known stage of this model, reported once, no batch dim of 1,
    logits of the last position. seq: the call's new positions; kv_len: every key it attends to (a decode step)."""
    if not isinstance(name, str):
        raise ImplementationError(f"reported a stage named {name!r}: stage names are strings like 'layers.0.q'")
    try:
        layer, stage = stages.parse(name)
    except KeyError:
        raise ImplementationError(f"reported an unknown stage {name[:80]!r} (the names: impl/stages.py)") from None
    if layer is not None and layer >= config.n_layers:
        raise ImplementationError(f"reported {name}, a stage outside the model: it has {config.n_layers} layers "
                                  f"(layers.0 to layers.{config.n_layers - 1})")
    if name in seen:
        raise ImplementationError(f"traced {name} twice: report each stage once per forward; a per-head loop "
                                  f"stacks its heads and reports them in one call, e.g. trace(name, "
                                  f"torch.stack(heads, dim=1)) for (seq, h, d), dim=0 for scores/probs (h, seq, seq)")
    t = _as_stage_tensor(name, tensor)
    expected = stages.step_shape(stage, config, seq, seq if kv_len is None else kv_len)
    if tuple(t.shape) == (1, *expected):  # a batch of one
        t = t[0]
    if name in (stages.LOGITS, stages.LOGPROBS_LAST) and tuple(t.shape[-2:]) == (seq, *expected):
        t = t.reshape(-1, *expected)[-1]  # every position reported: the stage is the last one
    return t.clone() if copy else t


def _weight_digests(weights) -> dict[str, str]:
    out = {}
    for name, t in weights.items():
        out[name] = hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
    return out


@contextlib.contextmanager
def _weights_for(weights) -> Iterator[dict[str, torch.Tensor]]:
    """The weights an implementation gets: copies, or above COPY_LIMIT_BYTES the weights themselves with their
    digests checked when it is done (ImplementationError if it wrote into them)."""
    size = sum(t.numel() * t.element_size() for t in weights.values())
    digests = _weight_digests(weights) if size > COPY_LIMIT_BYTES else None
    yield dict(weights) if digests is not None else {k: v.clone() for k, v in weights.items()}
    if digests is not None:
        changed = [k for k, d in _weight_digests(weights).items() if d != digests[k]]
        if changed:
            raise ImplementationError(f"the implementation wrote into the weights it was given ({changed[0]}"
                                      + (f" and {len(changed) - 1} more" if len(changed) > 1 else "")
                                      + "): weights are read-only inputs, copy before modifying")


def _traced_call(fn: Implementation, tokens: list[int], given, config, *, kv_len: int | None = None,
                 cached: dict | None = None, context: str = "", prefix: str = "", before: tuple[str, ...] = (),
                 on_stage: Callable[[str, torch.Tensor], None] | None = None
                 ) -> tuple[dict[str, torch.Tensor | None], object]:
    """One call of fn under the trace protocol: (the stages it reported, what it returned).

    on_stage(name, tensor): each stage as it is traced (the checker's `Stream`), kept nowhere else (the stages
    returned are then None). cached: the decode protocol's keywords (start_pos, cache), passed as given; context:
    where in a decode run the call is ('decode step 2 at position 18'), said in every error. An error carries the
    golden keys of the stage it is about (`stage`) and of those traced before it in the run (`traced`): a decode
    step's are `prefix` + key ('decode.2.'), after the keys traced in the calls `before` it.
    """
    seen: dict[str, torch.Tensor | None] = {}
    errors: list[ImplementationError] = []
    ours: list[BaseException] = []  # raised by on_stage (the checker), not by the user's code
    seq = len(tokens)
    during = f" (in {context})" if context else ""

    def trace(name, tensor) -> None:
        if errors:
            raise errors[0]
        try:
            t = _normalise(name, tensor, config, seq, seen, kv_len, copy=on_stage is None)
        except ImplementationError as e:
            if context:
                e = ImplementationError(f"{e}{during}")
            e.stage = prefix + name if isinstance(name, str) else None
            errors.append(e)
            raise e from None
        seen[name] = t if on_stage is None else None
        if on_stage is not None:
            try:
                on_stage(name, t)
            except Exception as e:
                ours.append(e)
                raise

    try:
        with torch.inference_mode(), user_code():
            result = fn(torch.tensor(tokens, dtype=torch.long), given, config, trace, **(cached or {}))
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # the user's code failed or tried to end the run: say where, in one line
        if errors and e is errors[0]:
            raise _traced(errors[0], seen, prefix, before) from None
        if ours:
            raise ours[0] from None
        last = next(reversed(seen), None) if seen else None
        raise _traced(ImplementationError(f"the implementation {raised_where(e, fn)} "
                                          f"({context + ', ' if context else ''}last stage traced: {last or 'none'})"),
                      seen, prefix, before) from None
    if errors:  # a bad trace call the user's code caught and went on from
        raise _traced(errors[0], seen, prefix, before)
    if ours:
        raise ours[0]
    return seen, result


def _traced(e: ImplementationError, seen, prefix: str = "", before: tuple[str, ...] = ()) -> ImplementationError:
    """e, with the golden keys traced before it (`traced`): where a crash happened, for pytest --impl."""
    e.traced = before + tuple(prefix + k for k in seen)
    return e


def run_implementation(fn: Implementation, tokens: list[int], weights, config,
                       on_stage: Callable[[str, torch.Tensor], None] | None = None) -> dict[str, torch.Tensor | None]:
    """Call fn under the trace protocol; returns the reported stages (detached copies).

    With `on_stage`, each reported stage goes to on_stage(name, tensor) inside the trace call (the tensor as
    the implementation reported it, normalised but not copied: compare it before returning) and is not kept:
    the returned dict then maps each reported name to None.

    The user's code cannot end or poison the run: anything it raises (SystemExit too; KeyboardInterrupt
    still interrupts) becomes one ImplementationError naming its file and line and the last stage it
    traced; it gets copies of the weights (or, above COPY_LIMIT_BYTES, the weights with their digest
    checked afterwards), so writing into them changes nothing for later checks; a bad trace call is an
    error even if the user's code catches it.
    """
    with _weights_for(weights) as given:
        seen, _ = _traced_call(fn, tokens, given, config, on_stage=on_stage)
    return seen


# ---------------------------------------------------------------- the decode protocol
def takes_cache(fn: Implementation) -> bool:
    """True if fn follows the decode protocol: it takes `start_pos` and `cache` (README, "Checking decoding")."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or an object without a signature: prefill only
        return False
    return "start_pos" in params and "cache" in params


def run_decode(fn: Implementation, golden: Golden, weights, config,
               on_prefill_stage: Callable[[str, torch.Tensor], None] | None = None
               ) -> tuple[dict[str, torch.Tensor | None], list[dict[str, torch.Tensor]]]:
    """The decode protocol: fn(prompt, ..., start_pos=0, cache=None) -> (logits, cache), then per step
    fn([token], ..., start_pos=position, cache=cache) with the cache it returned; the stages of the prefill (to
    on_prefill_stage as they come, as run_implementation's on_stage) and of each step. The tokens fed are the
    golden's (golden.decode: the fp32 reference's greedy tokens)."""
    plan = plan_of(golden)
    with _weights_for(weights) as given:
        prefill, result = _traced_call(fn, golden.tokens, given, config, cached={"start_pos": 0, "cache": None},
                                       context="the prefill of a decode run", on_stage=on_prefill_stage)
        steps, traced = [], tuple(prefill)
        for step in range(1, plan.steps + 1):
            cache = _returned_cache(result, "the prefill" if step == 1 else f"decode step {step - 1}")
            position = plan.position(step)
            prefix = stages.decode_key(step, "")
            seen, result = _traced_call(fn, [plan.greedy[step - 1]], given, config, kv_len=position + 1,
                                        cached={"start_pos": position, "cache": cache}, prefix=prefix, before=traced,
                                        context=f"decode step {step} at position {position}")
            steps.append(seen)
            traced += tuple(prefix + k for k in seen)
        _returned_cache(result, f"decode step {plan.steps}")
    return prefill, steps


def _returned_cache(result, where: str):
    """The cache of a (logits, cache) result, or ImplementationError saying what the call returned instead."""
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        got = type(result).__name__ + (f" of {len(result)}" if isinstance(result, (tuple, list)) else "")
        raise ImplementationError(f"{where}: a cached implementation (it takes start_pos and cache) returns "
                                  f"(logits, cache), not a {got}")
    return result[1]


class Stream:
    """Compares each stage as the implementation traces it, then lets it go (`run_implementation(on_stage=...)`).

    It keeps each stage's result, the logits check, and one tensor: the implementation's tensor of the earliest
    failing stage in forward order so far, for the diagnosis. So a check holds the model, the golden and the
    implementation's own working set, not every stage at once: an 8-layer check needs no more than a 2-layer one
    (tests/test_sampling.py measures it). A sampled golden's stage (golden.sampling) is reduced here, from the full
    tensor, with the recorder's own sampling function.
    """

    def __init__(self, expected, dtype: str, reference=None, hf_layout_config=None):
        self.expected, self.reference = expected, reference
        self.hf_layout_config = hf_layout_config  # --qk-layout hf: q/k stages put in Meta's order as they arrive
        self.judge = cmp.judge_for(expected, dtype, reference)
        self.judged: dict[str, cmp.StageResult] = {}
        self.reported: list[str] = []
        self.logits: cmp.LogitsCheck | None = None
        self.kept: tuple[str, torch.Tensor] | None = None  # (key, tensor) of the earliest failing stage
        # layout_hint's inputs: q and q_rope as reported, of the layer where a q or k stage is the earliest failure
        self.layout_inputs: dict[str, torch.Tensor] = {}
        self._last_q: tuple[str, torch.Tensor] | None = None  # the latest layer's q as reported (one tensor)

    def __call__(self, key: str, raw: torch.Tensor) -> None:
        self.reported.append(key)
        if key not in self.expected:
            return
        layer, stage = stages.parse(key)
        hf = self.hf_layout_config is not None and stage in QK_STAGES
        t = to_meta_layout({key: raw}, self.hf_layout_config)[key] if hf else raw
        r = self.judge.stage(key, t)
        self.judged[key] = r
        if key == stages.LOGITS:
            self.logits = cmp.logits_check(self.expected, t, self.reference)
        if stage == stages.Q:
            self._last_q = (key, raw.clone())
        if r.status == cmp.FAIL and (self.kept is None or cmp.forward_rank(key) < cmp.forward_rank(self.kept[0])):
            self.kept = (key, t.clone())
            self.layout_inputs = {}
            if stage in (stages.Q, stages.K) and self._last_q is not None and self._last_q[0] == stages.key(stages.Q,
                                                                                                             layer):
                self.layout_inputs = dict([self._last_q])
        if stage == stages.Q_ROPE and self.layout_inputs and self.kept[0] in (stages.key(stages.Q, layer),
                                                                              stages.key(stages.K, layer)):
            self.layout_inputs[key] = raw.clone()

    def report(self, partial: bool = False) -> cmp.Report:
        report = cmp.assemble(list(self.expected), self.judged, self.judge.dtype, self.reported)
        report.partial, report.logits = partial, self.logits
        return report

    def actual(self) -> dict[str, torch.Tensor | None]:
        """What the diagnosis reads: every reported key, with the kept tensor under its key (None elsewhere)."""
        out: dict[str, torch.Tensor | None] = dict.fromkeys(self.reported)
        if self.kept is not None:
            out[self.kept[0]] = self.kept[1]
        return out


def check_golden(fn: Implementation, golden: Golden, truth: Golden, config, weights, partial: bool = False,
                 qk_layout: str = "meta") -> cmp.Report:
    """Run fn on the golden's tokens and compare every stage with the fp32 truth as it is traced (`Stream`).

    bf16: the reference's own bf16 error (golden against truth) sets each stage's limit. Stages fn does not
    report make the verdict INCOMPLETE, or PARTIAL when `partial`. qk_layout "hf": fn reports q, k, q_rope and
    k_rope in transformers' rotate-half layout; they are put in Meta's order before the comparison.
    """
    _check_layout(qk_layout)
    stream = _stream(golden, truth, config, qk_layout)
    run_implementation(fn, golden.tokens, weights, config, on_stage=stream)
    return _prefill_report(stream, truth, config, weights, partial, qk_layout)


def _stream(golden: Golden, truth: Golden, config, qk_layout: str) -> Stream:
    return Stream(truth.tensors, golden.dtype, golden.tensors if golden.dtype == "bf16" else None,
                  config if qk_layout == "hf" else None)


def _prefill_report(stream: Stream, truth: Golden, config, weights, partial: bool, qk_layout: str) -> cmp.Report:
    """The Report of a streamed prefill, its first failure diagnosed (and, for a q or k, whether the other q/k
    layout explains it)."""
    report = stream.report(partial)
    first = report.first_failure
    if first is not None:  # say why, not only where (golden.diagnose): the first failing stage only
        from golden.diagnose import diagnose

        first.diagnosis = diagnose(first.key, stream.actual(), truth.tensors, config, weights,
                                   diagnosis_limit(first))
        hint = layout_hint(report, stream.layout_inputs, truth.tensors, qk_layout)
        if hint:
            report.hints.append(hint)
    return report


def check_with_decode(fn: Implementation, golden: Golden, truth: Golden, config, weights, partial: bool = False,
                      qk_layout: str = "meta") -> tuple[cmp.Report, DecodeReport]:
    """The prefill check and, where the golden holds decode steps and fn takes a cache, the decode steps' (one run:
    the prefill that fills the cache is the one checked). A prefill-only fn gets DecodeReport.not_run, never a
    failure."""
    why_not = why_not_run(takes_cache(fn), golden)
    if why_not:
        return check_golden(fn, golden, truth, config, weights, partial, qk_layout), not_run(why_not, golden)
    _check_layout(qk_layout)
    check_same_plan(golden, truth)
    stream = _stream(golden, truth, config, qk_layout)
    _, steps = run_decode(fn, golden, weights, config, on_prefill_stage=stream)
    if qk_layout == "hf":
        steps = [to_meta_layout(s, config) for s in steps]
    return (_prefill_report(stream, truth, config, weights, partial, qk_layout),
            check_steps(steps, golden, truth, config, weights, partial))


# ---------------------------------------------------------------- the q/k layout (--qk-layout)
# "meta": q/k stages in Meta's interleaved-pair order, as the goldens hold them; "hf": transformers' rotate-half order
# (ports of modeling_llama.py, Sebastian Raschka's from-scratch Llama 3), converted before comparing.
QK_LAYOUTS = ("meta", "hf")
QK_STAGES = frozenset({stages.Q, stages.K, stages.Q_ROPE, stages.K_ROPE})


def to_meta_layout(reported: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """q, k, q_rope and k_rope reported in rotate-half order (j, j + d/2 pairs within each head), put in Meta's
    interleaved order (2j, 2j + 1); every other stage as it is. A tensor whose last axis is not head_dim is left
    for the comparator to call a shape mismatch."""
    from impl.layout import rotate_half_to_interleaved

    out = dict(reported)
    for key, t in reported.items():
        if stages.parse(key)[1] in QK_STAGES and t.dim() >= 1 and t.shape[-1] == config.head_dim:
            out[key] = rotate_half_to_interleaved(t)
    return out


def layout_hint(report: cmp.Report, reported, golden, qk_layout: str) -> str:
    """Where the first failure is a q or k: whether the implementation's q AND q_rope are the golden's in the other
    layout (then it is a layout, say which flag; q alone matching is a bug: e.g. HF-ordered wq/wk rows with
    interleaved RoPE). reported: the stages as the implementation gave them; golden: the fp32 truth."""
    from golden.diagnose import qk_layout as layout_of

    first = report.first_failure
    if first is None or first.stage not in (stages.Q, stages.K) or first.layer is None:
        return ""
    if any(isinstance(golden.get(stages.key(s, first.layer)), Sampled) for s in (stages.Q, stages.Q_ROPE)):
        return ""  # a long prompt's golden keeps a few rows of q: the layout test needs them all
    other = "interleaved" if qk_layout == "hf" else "rotate_half"
    for stage in (stages.Q, stages.Q_ROPE):
        key = stages.key(stage, first.layer)
        if key not in reported or key not in golden:
            return ""
        if layout_of(reported[key], golden[key], report.result(key).limit) != other:
            return ""
    where = f"layers.{first.layer}.q and q_rope"
    if other == "rotate_half":
        return (f"q matches the golden in rotate-half layout: pass --qk-layout hf ({where} match after each head's "
                f"pairs (j, j + d/2) are put in Meta's order (2j, 2j + 1))")
    return (f"q matches the golden in Meta's interleaved layout as reported: drop --qk-layout hf ({where} match "
            f"without conversion)")


def _check_layout(qk_layout: str) -> None:
    if qk_layout not in QK_LAYOUTS:
        raise ImplementationError(f"--qk-layout {qk_layout!r}: expected one of {', '.join(QK_LAYOUTS)}")


def diagnosis_limit(first: cmp.StageResult) -> float:
    """How close a hypothesis must come to the implementation's tensor to explain it.

    The stage's size bound, except where only bf16's scale-bias rule failed the stage: that error (an eps
    bug: ~1%) sits inside the size bound, so hypotheses are told apart at twice the reference's own bf16
    error, the noise the scale-bias rule measures against.
    """
    sb, ref = first.scale_bias, first.ref_metrics
    if sb is not None and not sb.ok and ref is not None and first.metrics.rel <= first.limit:
        return 2 * ref.rel
    return first.limit


# ---------------------------------------------------------------- the tokenizer, offline
def asset_on_disk(name: str) -> bool:
    """Whether every file of a fetch-registry asset (impl.assets.ASSETS) is in the cache; never fetches. The loader
    still verifies each file's sha256."""
    from impl import assets

    folder = assets.cache_dir() / name
    return name in assets.ASSETS and all((folder / m.filename).is_file() for m in assets.ASSETS[name])


def tokenizer_on_disk(spec) -> Path | None:
    """Where the tokenizer `spec` (an asset name or a path, as a Checkpoint names it) already lies on disk,
    or None. Never fetches: the check runs offline."""
    from impl import assets

    if spec is None:
        return None
    name = str(spec)
    if name in assets.ASSETS:
        return assets.cache_dir() / name if asset_on_disk(name) else None
    path = Path(name)
    return path if path.exists() else None


def load_tokenizer_offline(spec):
    """(tokenizer or None, why not): the tokenizer if it is on disk and loads."""
    path = tokenizer_on_disk(spec)
    if path is None:
        hint = f" (python -m impl fetch {spec})" if isinstance(spec, str) and "/" not in spec else ""
        return None, f"tokenizer {spec} is not on disk{hint}" if spec is not None else "no tokenizer with the model"
    try:
        from impl.tokenizer import load_tokenizer

        return load_tokenizer(path), ""
    except Exception as e:  # a broken tokenizer file: the check of the prompt cannot run, and says why
        return None, f"tokenizer {path} does not load ({e.__class__.__name__})"


def verify_prompt(golden: Golden, tokenizer, why_not: str = "") -> str:
    """The golden's prompt must tokenize to its tokens. Returns what was found, for the report:
    'tokenizes to the 17 tokens' or 'not re-tokenized: <why>'; GoldenError where they disagree."""
    if tokenizer is None:
        return f"not re-tokenized: {why_not}"
    try:
        ids = [int(t) for t in tokenizer.encode(golden.manifest["prompt"], bos=True)]
    except Exception as e:
        raise GoldenError(f"{golden.path / MANIFEST}: the prompt does not tokenize ({e.__class__.__name__})") from None
    if ids != golden.tokens:
        pairs = zip(ids, golden.tokens, strict=False)
        i = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(ids), len(golden.tokens)))
        raise GoldenError(f"{golden.path / MANIFEST}: the prompt tokenizes to {len(ids)} tokens that differ from the "
                          f"golden's {len(golden.tokens)} at position {i} (edited prompt or tokens)")
    return f"tokenizes to the golden's {len(ids)} tokens"


# ---------------------------------------------------------------- check
@dataclass
class Outcome:
    golden: Golden  # the golden of the checked dtype
    report: cmp.Report
    tokenizer: object = None  # a loaded impl.tokenizer.Tokenizer, for showing the next token as text
    prompt_check: str = ""  # 'tokenizes to ...' or 'not re-tokenized: why'
    impl: str = "impl"  # the implementation checked, as the user named it (--impl), for titles
    decode: DecodeReport | None = None  # the decode steps' check (its own verdict), or why none ran

    @property
    def passed(self) -> bool:
        """The prefill passed (or a --partial one) and the decode passed or had nothing to run: exit 0."""
        return self.report.passed and (self.decode is None or self.decode.passed)


def check(path: str | Path | None = None, impl: str | None = None, dtypes: tuple[str, ...] = ("fp32", "bf16"),
          fn: Implementation | None = None, partial: bool = False, model: str | None = None,
          qk_layout: str = "meta") -> list[Outcome]:
    """Check an implementation against every golden of a set, fp32 first.

    `model`: the model to load instead of the one the golden names (needed for goldens of a path or a Hub
    id). `partial`: check only what the implementation reports (it must still report logits). `qk_layout`:
    "hf" where the implementation reports q/k stages in transformers' rotate-half layout.
    """
    if qk_layout not in QK_LAYOUTS:
        raise ImplementationError(f"--qk-layout {qk_layout!r}: expected one of {', '.join(QK_LAYOUTS)}")
    fn = fn or load_callable(impl)
    goldens = golden_set(path)
    tokenizers: dict[object, tuple] = {}  # tokenizer spec -> (loaded tokenizer, why not): one load per spec
    checkpoints: dict = {}  # model name -> (Checkpoint, digest): one load per model
    outcomes = []
    for g in sorted(goldens, key=lambda g: g.dtype != "fp32"):
        if g.dtype not in dtypes:
            continue
        truth = g if g.dtype == "fp32" else fp32_truth(g, goldens)
        if truth is None:
            raise GoldenError(f"{g.path}: a bf16 check needs the fp32 golden of the same model and prompt beside it")
        if truth.manifest["prompt"] != g.manifest["prompt"]:
            raise GoldenError(f"{g.path}: recorded on another prompt than its fp32 golden {truth.path}")
        if _rows(truth) != _rows(g):
            raise GoldenError(f"{g.path}: sampled at other positions than its fp32 golden {truth.path} (re-record both "
                              f"with one version)")
        ckpt, weights = load_model_for(g, g.torch_dtype, model, checkpoints)
        key = str(ckpt.tokenizer)
        if key not in tokenizers:
            tokenizers[key] = load_tokenizer_offline(ckpt.tokenizer)
        tok, why_not = tokenizers[key]
        prompt_check = verify_prompt(g, tok, why_not)
        report, decode = check_with_decode(fn, g, truth, ckpt.config, weights, partial, qk_layout)
        outcomes.append(Outcome(g, report, tok, prompt_check, impl or "impl", decode))
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
    if a.manifest["prompt"] != b.manifest["prompt"]:
        raise GoldenError(f"{b.path}: recorded on another prompt than {a.path}; goldens of different prompts cannot "
                          f"be diffed")
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
    prompt_check: str = ""
    decode: DecodeReport | None = None  # the decode steps, b against a

    @property
    def passed(self) -> bool:
        return self.report.passed and (self.decode is None or self.decode.passed)


def tokenizer_of(model_name: str):
    """The tokenizer a golden's model name implies without loading the model: the presets' asset, an asset."""
    from impl import assets
    from impl.weights import RANDOM_PRESETS, TOKENIZER_ASSET

    if model_name in RANDOM_PRESETS:
        return TOKENIZER_ASSET
    return str(assets.cache_dir() / model_name) if model_name in assets.ASSETS else None


def diff(a: str | Path, b: str | Path) -> Diff:
    """Load two golden folders and diff b against a (both of one model and prompt, which must tokenize to
    their tokens where the tokenizer is on disk)."""
    ga, gb = load_golden(a), load_golden(b)
    tok, why_not = load_tokenizer_offline(tokenizer_of(ga.model_name))
    verify_prompt(ga, tok, why_not)
    prompt_check = verify_prompt(gb, tok, why_not)
    return Diff(ga, gb, diff_goldens(ga, gb), prompt_check, diff_steps(ga, gb))
