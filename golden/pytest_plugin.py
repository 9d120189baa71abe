"""`pytest --impl my_llama:forward`: the golden checks of your implementation as pytest tests (a pytest11 plugin).

The package registers this module through the `pytest11` entry point (pyproject.toml), so it is active in every
project where llama3-golden is installed; this repository's root conftest.py names it too (`pytest_plugins`), for
a checkout whose installed metadata predates the entry point. It is the one place that defines `--impl`,
`--partial`, `--qk-layout`, `--golden` and `--golden-dtype`.

What a run collects:

- no `--impl`: nothing; the plugin changes nothing.
- `pytest --impl X` (no paths named): ONLY the checks of X, no file is collected. One test per golden x dtype x
  stage, in forward order, with ids like `tiny/fp32::layers.0.q_rope`. X runs once per golden and dtype (a session
  cache); the first failing stage fails, the stages after it that fail too are skipped as its consequences, a stage
  X does not report fails (or is skipped under `--partial`), `logits` also judges the next token (KL, top-1). A
  crash fails one test, the stage X was computing, with X's file and line; that golden's other tests are skipped
  ("implementation crashed, see ..."). Goldens: golden.check.DEFAULT_SET and smollm2-135m (one skipped test
  naming the `python -m impl fetch` to run where its model is not fetched), or those named by `--golden`.
- `pytest PATH... --impl X`: the named paths only, as any pytest run; their tests may read `--impl` (this
  repository's benchmarks time X's forward). No checks are added.

A golden's decode steps (golden.decode) are tests of its group too, one per step and stage, after the prefill's
(`tiny/fp32::decode.1.layers.0.k_rope`): the run that checks the prefill with a KV cache goes on through the steps
(golden.check.check_with_decode), so the implementation still runs once per golden and dtype. A prefill-only
implementation gets one skipped `decode` test saying so.

More checks of the same implementation plug in as *groups*: a provider appended to PROVIDERS maps the pytest
config to a list of `Group`s (an id, its test
names known before anything runs, and `run`, called once per session, which returns a `Result` per name or raises
`Crash`); they are collected, cached, selected and reported like the stage tests. An option that should turn
the plugin on by itself goes into ACTIVATING_OPTIONS. Shared loading (the implementation, goldens, models) is
`checks_of(config)`. The tokenizer check (`--impl-tokenizer`) is a plugin of its own, golden/pytest_tokenizer.py,
and runs beside this one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


@dataclass(frozen=True)
class Result:
    """The outcome of one test: PASSED, FAILED or SKIPPED, with the message pytest shows."""

    status: str
    message: str = ""


class Crash(Exception):
    """Raised by a group's `run`: the user's code could not be checked. The test `at` (or, where it is not selected,
    the group's first selected test) fails with the one-line message; the group's other tests are skipped, pointing
    at it."""

    def __init__(self, message: str, at: str | None = None):
        super().__init__(message)
        self.message, self.at = message, at


@dataclass(frozen=True)
class Group:
    """One run of the user's code and the tests it decides: `tiny/fp32` and its 43 stage tests."""

    id: str  # the tests' ids are f"{id}::{name}"
    names: tuple[str, ...]  # the tests, in order; known without running anything
    run: Callable[[], Mapping[str, Result]]  # once per session: a Result for every name, or raises Crash
    path: Path | None = None  # where the group's data lives: the tests' location in reports


# ---------------------------------------------------------------- options
def pytest_addoption(parser: pytest.Parser) -> None:
    from golden.check import QK_LAYOUTS

    group = parser.getgroup("llama3-golden", "check your Llama 3 implementation against the goldens (llama3-golden)")
    group.addoption("--impl", default=None, metavar="MODULE:CALLABLE",
                    help="your implementation in the trace protocol (module:callable or path/to/file.py:callable): "
                         "without test paths, run only its golden checks, one test per golden, dtype and stage; "
                         "with paths, those tests (the benchmarks time it)")
    group.addoption("--partial", action="store_true", default=False,
                    help="check only the stages the implementation reports (logits still required); without it a "
                         "stage not reported fails")
    group.addoption("--qk-layout", choices=QK_LAYOUTS, default="meta",
                    help="the layout of your q, k, q_rope and k_rope stages: meta (interleaved pairs, as the goldens) "
                         "or hf (transformers' rotate-half), converted before comparing")
    group.addoption("--golden", action="append", default=None, metavar="PATH",
                    help="a golden folder, a folder of them, or a committed golden's name (tiny, tiny/fp32, "
                         "smollm2-135m); repeatable; default: the committed default set and smollm2-135m")
    group.addoption("--golden-dtype", choices=("fp32", "bf16", "both"), default="both",
                    help="check the fp32 or the bf16 goldens only (a fp32 check gets fp32 weights)")


# The options that make a run collect the plugin's checks (and nothing else) when no test path is named.
ACTIVATING_OPTIONS = ["impl"]


def _active(config: pytest.Config) -> bool:
    """The plugin collects: one of its options is given and no test path was named on the command line."""
    if config.args_source == pytest.Config.ArgsSource.ARGS:
        return False
    return any(config.getoption(name, None) for name in ACTIVATING_OPTIONS)


# ---------------------------------------------------------------- the session's shared loading
class Checks:
    """What one pytest session loads once: the implementation, goldens, models, and each group's results."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self._fn = None
        self._goldens: dict[Path, object] = {}
        self._checkpoints: dict[str, tuple] = {}  # model name -> (Checkpoint, digest)
        self._results: dict[str, dict[str, Result]] = {}
        self.selected: dict[str, list[str]] = {}  # group id -> the names of its tests this run selected

    def implementation(self):
        """`--impl` loaded (ImplementationError -> a one-line usage error). The folder pytest runs in is first on
        the import path, as under `python -m pytest`, so `my_llama:forward` finds ./my_llama.py (the `pytest`
        command leaves it off)."""
        from golden.check import ImplementationError, load_callable

        if self._fn is None:
            here = str(self.config.invocation_params.dir)
            if here not in sys.path:
                sys.path.insert(0, here)
            try:
                self._fn = load_callable(self.config.getoption("impl"))
            except ImplementationError as e:
                raise pytest.UsageError(str(e)) from None
        return self._fn

    def golden(self, folder: Path):
        from golden.format import load_golden

        if folder not in self._goldens:
            self._goldens[folder] = load_golden(folder)
        return self._goldens[folder]

    def model(self, golden):
        """(Checkpoint, weights in the golden's dtype) for the golden's model, verified to be that model. The
        checkpoint is loaded once per model; the weights in the dtype are not kept."""
        from golden.check import load_model_for

        return load_model_for(golden, golden.torch_dtype, loaded=self._checkpoints)

    def results(self, group: Group) -> dict[str, Result]:
        """The group's results, running it the first time they are asked for."""
        if group.id not in self._results:
            self._results[group.id] = self._run(group)
        return self._results[group.id]

    def _run(self, group: Group) -> dict[str, Result]:
        selected = self.selected.get(group.id) or list(group.names)
        try:
            out = dict(group.run())
        except Crash as c:
            at = c.at if c.at in selected else selected[0]
            out = {n: Result(SKIPPED, f"implementation crashed, see {group.id}::{at}") for n in group.names}
            out[at] = Result(FAILED, c.message)
            return out
        missing = [n for n in group.names if n not in out]
        if missing:  # a provider that forgot a test: never a silent pass
            raise RuntimeError(f"{group.id}: no result for {', '.join(missing[:3])}")
        return out


_CHECKS = pytest.StashKey[Checks]()
_GROUPS = pytest.StashKey[list[Group]]()


def checks_of(config: pytest.Config) -> Checks:
    if _CHECKS not in config.stash:
        config.stash[_CHECKS] = Checks(config)
    return config.stash[_CHECKS]


# ---------------------------------------------------------------- the prefill checks: golden x dtype x stage
def golden_folders(config: pytest.Config) -> list[tuple[Path, bool]]:
    """(golden folder, named by --golden) for every golden the run checks, in the order given."""
    from golden import check

    def fp32_first(folders: list[Path]) -> list[Path]:
        return sorted(folders, key=lambda p: p.name != "fp32")

    named = config.getoption("golden")
    if named:
        return [(p, True) for name in named for p in fp32_first(check.golden_folders(name))]
    default = (*check.DEFAULT_SET, "smollm2-135m")
    return [(p, False) for name in default for p in fp32_first(check.golden_folders(check.DATA / name))]


def shown(folder: Path, here: Path) -> str:
    """A golden folder as a command line names it: a committed golden by name (tiny/fp32), another relative to the
    folder pytest runs in where it lies below it."""
    from golden.check import DATA

    for base in (DATA, here):
        try:
            return str(folder.resolve().relative_to(base.resolve()))
        except ValueError:
            continue
    return str(folder)


def _group_id(folder: Path, dtype: str, taken: set[str]) -> str:
    """tiny/fp32 for golden/data/tiny/fp32; my-golden/fp32 for a golden folder not named after its dtype."""
    base = f"{folder.parent.name if folder.name == dtype else folder.name}/{dtype}"
    gid, n = base, 1
    while gid in taken:
        n += 1
        gid = f"{base}-{n}"
    taken.add(gid)
    return gid


def prefill_groups(config: pytest.Config) -> list[Group]:
    """One group per golden and dtype, a test per stage; one group per model that is not fetched."""
    from golden.check import asset_on_disk
    from golden.format import GoldenError, read_manifest
    from impl import assets

    if not config.getoption("impl"):
        return []
    checks = checks_of(config)
    dtypes = ("fp32", "bf16") if config.getoption("golden_dtype") == "both" else (config.getoption("golden_dtype"),)
    groups: list[Group] = []
    taken: set[str] = set()
    not_fetched: dict[str, bool] = {}
    try:
        folders = golden_folders(config)
        manifests = [(folder, named, read_manifest(folder)) for folder, named in folders]
    except GoldenError as e:
        raise pytest.UsageError(f"--golden: {e}") from None
    for folder, named, manifest in manifests:
        model, dtype = manifest["model"]["name"], manifest["dtype"]
        if dtype not in dtypes:
            continue
        if model in assets.ASSETS and not asset_on_disk(model):
            not_fetched[model] = not_fetched.get(model, False) or named
            continue
        gid = _group_id(folder, dtype, taken)
        names = _test_names(manifest, checks)
        groups.append(Group(gid, names, _prefill_run(checks, gid, folder, names), folder))
    for model, named in not_fetched.items():
        why = f"{model}: its model is not fetched here; run `python -m impl fetch {model}` to check its goldens too"
        result = Result(FAILED if named else SKIPPED, why)
        groups.append(Group(model, ("not-fetched",), lambda r=result: {"not-fetched": r}))
    if not groups:
        raise pytest.UsageError(f"--golden-dtype {config.getoption('golden_dtype')}: no golden of that dtype among "
                                f"{', '.join(str(f) for f, _ in folders)}")
    return groups


def _test_names(manifest, checks: Checks) -> tuple[str, ...]:
    """The golden's prefill stages, then its decode steps' (golden keys: decode.1.layers.0.k_rope) where the
    implementation takes a KV cache (golden.check.takes_cache); for a prefill-only one, a single `decode` test
    that says why they did not run."""
    from golden.check import takes_cache
    from impl import stages

    names = [s["name"] for s in manifest["stages"]]
    prefill = tuple(n for n in names if stages.split_step(n)[0] is None)
    decode = tuple(n for n in names if stages.split_step(n)[0] is not None)
    if not decode:
        return prefill
    return prefill + (decode if takes_cache(checks.implementation()) else ("decode",))


def _prefill_run(checks: Checks, gid: str, folder: Path, names: tuple[str, ...]) -> Callable[[], dict[str, Result]]:
    def run() -> dict[str, Result]:
        from golden import check
        from impl.errors import Llama3GoldenError

        config = checks.config
        fn = checks.implementation()
        try:
            golden = checks.golden(folder)
            truth = golden
            if golden.dtype != "fp32":
                beside = [checks.golden(p) for p in check._golden_folders(folder.parent)]
                truth = check.fp32_truth(golden, beside)
                if truth is None:
                    raise Crash(f"{folder}: a bf16 check needs the fp32 golden of the same model and prompt beside it")
            ckpt, weights = checks.model(golden)
            report, decode = check.check_with_decode(fn, golden, truth, ckpt.config, weights,
                                                     config.getoption("partial"), config.getoption("qk_layout"))
        except check.ImplementationError as e:  # a bad trace call fails its stage; a crash the stage it was computing
            if e.stage in names:
                raise Crash(str(e), at=e.stage) from None
            stage = next((n for n in names if n not in e.traced), names[-1])
            raise Crash(f"crashed before reporting {stage}: {e}", at=stage) from None
        except Llama3GoldenError as e:  # a golden or model that cannot be checked: one line
            raise Crash(str(e)) from None
        where = shown(folder, config.invocation_params.dir)
        how = (f"python -m golden check {where} --impl {config.getoption('impl')} --dtype {golden.dtype}"
               + (" --qk-layout hf" if config.getoption("qk_layout") == "hf" else "")
               + (" --partial" if config.getoption("partial") else ""))
        return {**stage_results(gid, report, golden.config, how), **decode_results(gid, decode, golden.config, how)}

    return run


def stage_results(gid: str, report, config, how: str = "") -> dict[str, Result]:
    """A golden check's Report as one Result per stage. `how`: the command that shows the whole table."""
    from golden import compare as cmp
    from golden.report import failure_lines, verdict_line
    from impl import stages

    first = report.first_failure
    lg = report.logits
    out: dict[str, Result] = {}
    for r in report.results:
        if r.status == cmp.PASS and not (r.key == stages.LOGITS and lg is not None and not lg.ok):
            out[r.key] = Result(PASSED)
        elif r.status == cmp.PASS:  # every stage within tolerance, the next token not: logits is the failure
            out[r.key] = Result(FAILED, f"{gid}: {_logits_text(lg)}")
        elif r.status == cmp.FAIL:
            lines = failure_lines(report, config)  # the first line names the stage: the summary line shows it
            if how:
                lines.append(f"  the whole table of {gid}: {how}")
            out[r.key] = Result(FAILED, "\n".join(lines))
        elif r.status == cmp.CONSEQUENCE:
            out[r.key] = Result(SKIPPED, f"beyond tolerance too, a consequence of the first failure at "
                                         f"{gid}::{first.key}")
        elif report.verdict == cmp.V_PARTIAL:
            out[r.key] = Result(SKIPPED, f"PARTIAL: {len(report.checked)} of {len(report.results)} stages ({gid}); "
                                         f"{r.key} not reported")
        else:
            out[r.key] = Result(FAILED, f"NOT REPORTED: {r.key} ({gid}). {verdict_line(report)}")
    return out


def decode_results(gid: str, decode, config, how: str = "") -> dict[str, Result]:
    """The decode steps' check as one Result per step and stage (golden keys), like stage_results: the first failing
    step's first failing stage fails with its diagnosis, what fails after it is skipped as its consequence; a
    prefill-only implementation's single `decode` test is skipped, saying so."""
    from golden import compare as cmp
    from golden.decode import NOT_RUN
    from golden.report import decode_failure_message, decode_verdict_line
    from impl import stages

    if decode.verdict == NOT_RUN:
        return {"decode": Result(SKIPPED, f"{gid}: {decode_verdict_line(decode)}")}
    first = decode.first_failing
    first_key = None
    if first is not None:
        failed = first.report.first_failure
        first_key = first.key(failed.key if failed is not None else stages.LOGITS)
    out: dict[str, Result] = {}
    for key, step, r in decode.results():
        lg = step.report.logits
        logits_bad = r.key == stages.LOGITS and lg is not None and not lg.ok
        if r.status == cmp.PASS and not logits_bad:
            out[key] = Result(PASSED)
        elif key == first_key:
            lines = (decode_failure_message(step, config) if step.report.first_failure is not None
                     else [f"step {step.step} (position {step.position}): {_logits_text(lg)}"])
            out[key] = Result(FAILED, "\n".join(lines + ([f"  the whole table of {gid}: {how}"] if how else [])))
        elif r.status in (cmp.FAIL, cmp.CONSEQUENCE, cmp.PASS):  # beyond tolerance after the first failure
            out[key] = Result(SKIPPED, f"beyond tolerance too, a consequence of the first failure at "
                                       f"{gid}::{first_key}")
        elif step.report.verdict == cmp.V_PARTIAL:
            out[key] = Result(SKIPPED, f"PARTIAL: {key} not reported ({gid}; a partial check, as asked)")
        else:
            out[key] = Result(FAILED, f"NOT REPORTED: {key} ({gid}). {decode_verdict_line(decode)}")
    return out


def _logits_text(lg) -> str:
    from golden.report import sci

    return (f"next token {lg.top1} vs the golden's {lg.top1_golden} ({'agree' if lg.top1_ok else 'DISAGREE'}), "
            f"KL {sci(lg.kl)} (limit {sci(lg.kl_limit)})")


# Where groups come from: each provider returns the groups its options ask for (none without them). A decode or
# tokenizer check appends its provider here.
PROVIDERS: list[Callable[[pytest.Config], Iterable[Group]]] = [prefill_groups]


def groups_of(config: pytest.Config) -> list[Group]:
    if _GROUPS not in config.stash:
        config.stash[_GROUPS] = [g for provider in PROVIDERS for g in provider(config)]
    return config.stash[_GROUPS]


# ---------------------------------------------------------------- collection
class GroupNode(pytest.Collector):
    """One group's tests (collected by the plugin, not from a file)."""

    def __init__(self, *, group: Group, **kwargs):
        super().__init__(**kwargs)
        self.group = group

    def collect(self) -> list[CheckItem]:
        return [CheckItem.from_parent(self, name=name) for name in self.group.names]


class CheckItem(pytest.Item):
    """One test of a group: its Result, computed when the group's first test runs."""

    def runtest(self) -> None:
        group = self.parent.group
        result = checks_of(self.config).results(group)[self.name]
        if result.status == SKIPPED:
            pytest.skip(result.message)
        if result.status == FAILED:
            pytest.fail(result.message, pytrace=False)

    def reportinfo(self):
        # The headline of a failure: `tiny/fp32 layers.0.q_rope` (a domain that ends the node id would have its dots
        # shown as `::`, as pytest does for Class.method).
        return self.parent.group.path or self.path, None, f"{self.parent.group.id} {self.name}"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """`pytest --impl X` collects no file: only X's checks."""
    return True if _active(config) else None


@pytest.hookimpl(tryfirst=True)  # before -k, -m and --deselect select among them
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _active(config):
        return
    checks_of(config).implementation()  # a bad --impl is one usage error, before any test
    for group in groups_of(config):
        node = GroupNode.from_parent(session, name=group.id, nodeid=group.id, group=group)
        items.extend(session.genitems(node))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Which tests of each group this run selected: a crash is shown on one of them, never on a deselected one."""
    checks = checks_of(session.config)
    for item in session.items:
        if isinstance(item, CheckItem):
            checks.selected.setdefault(item.parent.group.id, []).append(item.name)
