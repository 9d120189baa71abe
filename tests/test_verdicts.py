"""Trustworthy verdicts (issue 9): no vacuous pass, user code that cannot end or poison the run, goldens that
must be whole, and the tool's promise (one line on stderr; exit 2 bad input, 1 failed or incomplete, 0 pass).

Each class is one parametrized test over a corpus of bad inputs, run through the real CLI (`golden.cli.main`)
on the committed tiny fp32 golden.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from golden import check as golden_check
from golden import cli
from golden import format as gf
from impl import stages
from impl.config import PRESETS
from tests.conftest import golden_dir

TINY = str(golden_dir("tiny", "fp32"))
HEADER = "import sys\nimport torch\nfrom impl import model\n\n"
KEEP9 = ("embeddings", "layers.0.q_rope", "layers.1.q_rope", "layers.0.probs", "layers.1.probs", "layers.0.out",
         "layers.1.out", "norm", "logits")


def _only(*keep: str, scale: str = "") -> str:
    """impl's forward reporting only `keep` (and `scale`, doubled: a wrong stage)."""
    return (f"def forward(tokens, w, cfg, trace):\n"
            f"    keep = {set(keep) | {scale} - {''}!r}\n"
            f"    def report(name, t):\n"
            f"        if name in keep:\n"
            f"            trace(name, t * 2 if name == {scale!r} else t)\n"
            f"    model.forward(tokens, w, cfg, trace=report)\n")


def _user_module(tmp_path, monkeypatch, name: str, body: str) -> str:
    """Write the implementation as a module of its own (unique name: no import cache) and return --impl's value."""
    module = "user_" + re.sub(r"\W", "_", name)
    (tmp_path / f"{module}.py").write_text(HEADER + body)
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{module}:forward"


def _line_of(body: str, marker: str = "# HERE") -> int:
    return HEADER.count("\n") + next(i for i, line in enumerate(body.splitlines(), 1) if marker in line)


# ---------------------------------------------------------------- 1. no vacuous pass
ALL_BUT_ONE = ("def forward(tokens, w, cfg, trace):\n"
               "    skip = 'layers.1.ffn_up'\n"
               "    model.forward(tokens, w, cfg, trace=lambda n, t: None if n == skip else trace(n, t))\n")
MISSING_ALL = ("missing tokens, embeddings, rope_cos, rope_sin; residual_in, attn_norm, q, k, v, q_rope, k_rope, "
               "scores, probs, attn_heads, attn_out, residual_attn, ffn_norm, ffn_gate, ffn_up, ffn_hidden, ffn_out, "
               "out in layers 0-1; norm, logits, logprobs_last; report every stage, or check only the reported ones "
               "with --partial")
VERDICTS = {
    "never-traces": ("def forward(tokens, w, cfg, trace):\n    pass\n", (), 1, "INCOMPLETE",
                     "INCOMPLETE: 0 of 43 stages reported; " + MISSING_ALL),
    "returns-logits-untraced": ("def forward(tokens, w, cfg, trace):\n    return model.forward(tokens, w, cfg)\n", (),
                                1, "INCOMPLETE", "INCOMPLETE: 0 of 43 stages reported; missing tokens"),
    "only-tokens": (_only("tokens"), (), 1, "INCOMPLETE",
                    "INCOMPLETE: 1 of 43 stages reported, all within tolerance; missing embeddings, rope_cos"),
    "only-logits": (_only("logits"), (), 1, "INCOMPLETE",
                    "INCOMPLETE: 1 of 43 stages reported, all within tolerance; missing tokens, embeddings"),
    "one-stage-missing": (ALL_BUT_ONE, (), 1, "INCOMPLETE",
                          "INCOMPLETE: 42 of 43 stages reported, all within tolerance; missing ffn_up in layer 1; "
                          "report every stage"),
    "partial-asked": (_only(*KEEP9), ("--partial",), 0, "PARTIAL",
                      "PARTIAL: 9 of 43 stages, all within tolerance (a partial check, as asked); not reported: "
                      "tokens, rope_cos, rope_sin; residual_in, attn_norm, q, k, v, k_rope, scores, attn_heads, "
                      "attn_out, residual_attn, ffn_norm, ffn_gate, ffn_up, ffn_hidden, ffn_out in layers 0-1; "
                      "logprobs_last"),
    "partial-without-logits": (_only(*KEEP9[:-1]), ("--partial",), 1, "INCOMPLETE",
                               "INCOMPLETE: 8 of 43 stages reported, all within tolerance; missing tokens"),
    "partial-of-nothing": ("def forward(tokens, w, cfg, trace):\n    pass\n", ("--partial",), 1, "INCOMPLETE",
                           "INCOMPLETE: 0 of 43 stages reported; missing"),
    "partial-with-a-wrong-stage": (_only(*KEEP9, scale="layers.1.out"), ("--partial",), 1, "FAIL",
                                   "FAIL: 8/9 stages within tolerance, 34 of 43 not reported"),
    "every-stage": (_only(*stages.every_stage(PRESETS["tiny"], 17)), (), 0, "PASS",
                    "PASS: 43/43 stages within tolerance"),
}


@pytest.mark.parametrize(("body", "flags", "exit_code", "verdict", "summary"), list(VERDICTS.values()),
                         ids=list(VERDICTS))
def test_check_passes_only_when_every_stage_is_reported(request, tmp_path, monkeypatch, capsys, body, flags,
                                                        exit_code, verdict, summary):
    impl = _user_module(tmp_path, monkeypatch, request.node.callspec.id, body)
    assert cli.main(["check", TINY, "--impl", impl, "--json", str(tmp_path / "r.json"), *flags]) == exit_code
    out = capsys.readouterr().out
    assert f"  {summary}" in out, out
    (data,) = json.loads((tmp_path / "r.json").read_text())
    assert (data["verdict"], data["passed"], data["partial"]) == (verdict, exit_code == 0, bool(flags))
    assert data["summary"].startswith(summary) and data["stages_total"] == 43


# ---------------------------------------------------------------- 1b, 2. bad trace calls and user code
PER_HEAD = ("def forward(tokens, w, cfg, trace):\n"
            "    def each(name, t):\n"
            "        for h in range(t.shape[1] if name.endswith('.q') else 1):\n"
            "            trace(name, t[:, h] if name.endswith('.q') else t)\n"
            "    model.forward(tokens, w, cfg, trace=each)\n")
AS_COMPLEX = ("def forward(tokens, w, cfg, trace):\n"
              "    def report(name, t):\n"
              "        if name.endswith('q_rope'):  # complex RoPE's own result, not turned back into real pairs\n"
              "            t = torch.view_as_complex(t.float().unflatten(-1, (-1, 2)).contiguous())\n"
              "        trace(name, t)\n"
              "    model.forward(tokens, w, cfg, trace=report)\n")
SWALLOWS = ("def forward(tokens, w, cfg, trace):\n"
            "    try:\n"
            "        trace('layers.9.q', torch.zeros(17, 8, 16))\n"
            "    except Exception:\n"
            "        pass  # and goes on as if nothing happened\n"
            "    model.forward(tokens, w, cfg, trace=trace)\n")
EXIT_0 = "def forward(tokens, w, cfg, trace):\n    trace('tokens', tokens)\n    sys.exit(0)  # HERE\n"
EXIT_TEXT = "def forward(tokens, w, cfg, trace):\n    sys.exit('bye')  # HERE\n"
OS_EXIT_0 = ("def forward(tokens, w, cfg, trace):\n    trace('tokens', tokens)\n"
             "    __import__('os')._exit(0)  # HERE\n")
HELPER = ("def helper(x):\n    return x.no_such_thing  # HERE\n\n"
          "def forward(tokens, w, cfg, trace):\n    trace('tokens', tokens)\n    trace('embeddings', helper(w))\n")
TORCH_ERROR = ("def forward(tokens, w, cfg, trace):\n"
               "    x = w['tok_embeddings.weight'][tokens]\n    trace('embeddings', x)\n"
               "    return x @ w['tok_embeddings.weight']  # HERE\n")
CTRL_C = "def forward(tokens, w, cfg, trace):\n    raise KeyboardInterrupt\n"
ONE_LINE_ERRORS = {
    "layer-outside-model": ("def forward(tokens, w, cfg, trace):\n    model.forward(tokens, w, cfg, trace=trace)\n"
                            "    trace('layers.2.q', torch.zeros(17, 8, 16))\n", 2,
                            r"reported layers\.2\.q, a stage outside the model: it has 2 layers \(layers\.0 to "
                            r"layers\.1\)"),
    "unknown-stage": ("def forward(tokens, w, cfg, trace):\n    trace('layers.0.query', torch.zeros(1))\n", 2,
                      r"reported an unknown stage 'layers\.0\.query'"),
    "stage-name-not-a-string": ("def forward(tokens, w, cfg, trace):\n    trace(3, torch.zeros(1))\n", 2,
                                r"reported a stage named 3: stage names are strings"),
    "per-head-loop": (PER_HEAD, 2, r"traced layers\.0\.q twice: report each stage once per forward; a per-head loop "
                                   r"stacks its heads and reports them in one call, e\.g\. trace\(name, "
                                   r"torch\.stack\(heads, dim=1\)\) for \(seq, h, d\)"),
    "complex-tensor": (AS_COMPLEX, 2, r"reported layers\.0\.q_rope as a complex tensor \(complex64\): report real "
                                      r"values"),
    "meta-tensor": ("def forward(tokens, w, cfg, trace):\n    trace('embeddings', torch.empty(17, 128, "
                    "device='meta'))\n", 2, r"reported embeddings as a meta tensor \(it holds no data\)"),
    "sparse-tensor": ("def forward(tokens, w, cfg, trace):\n"
                      "    trace('embeddings', w['tok_embeddings.weight'][tokens].to_sparse())\n", 2,
                      r"reported embeddings as a torch\.sparse_coo tensor: report a dense one"),
    "not-a-tensor": ("def forward(tokens, w, cfg, trace):\n    trace('embeddings', 'hello')\n", 2,
                     r"reported embeddings as a str, not a tensor"),
    "error-swallowed-by-user": (SWALLOWS, 2, r"reported layers\.9\.q, a stage outside the model"),
    "sys-exit-0": (EXIT_0, 2, r"the implementation called sys\.exit\(0\) at \S*user_\w+\.py:{line} "
                              r"\(last stage traced: tokens\)"),
    "sys-exit-text": (EXIT_TEXT, 2, r"called sys\.exit\('bye'\) at \S*\.py:{line} \(last stage traced: none\)"),
    "os-exit-0": (OS_EXIT_0, 2, r"the implementation called os\._exit\(0\) at \S*user_\w+\.py:{line} "
                                r"\(last stage traced: tokens\)"),
    "raise-in-helper": (HELPER, 2, r"raised AttributeError: 'dict' object has no attribute 'no_such_thing' at "
                                   r"\S*\.py:{line} \(last stage traced: tokens\)"),
    "torch-error": (TORCH_ERROR, 2, r"raised RuntimeError: .* at \S*user_\w+\.py:{line} \(last stage traced: "
                                    r"embeddings\)"),
    "ctrl-c": (CTRL_C, 130, r"^interrupted$"),
}


@pytest.mark.parametrize(("body", "exit_code", "message"), list(ONE_LINE_ERRORS.values()), ids=list(ONE_LINE_ERRORS))
def test_bad_implementation_is_one_line_never_a_verdict(request, tmp_path, monkeypatch, capsys, body, exit_code,
                                                        message):
    impl = _user_module(tmp_path, monkeypatch, request.node.callspec.id, body)
    assert cli.main(["check", TINY, "--impl", impl]) == exit_code
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured
    pattern = message.replace("{line}", str(_line_of(body))) if "{line}" in message else message
    assert re.search(pattern, captured.err.rstrip("\n").removeprefix("error: ")), captured.err


def test_implementation_writing_into_weights_changes_nothing_for_later_checks(models, check_against):
    """Under `pytest --impl` the session's weights are shared: the runner hands out copies."""
    from golden.check import impl_forward
    from impl import model
    from impl.weights import sha256_of_weights

    _, weights = models("tiny", "fp32")
    before = sha256_of_weights(weights)

    def vandal(tokens, w, cfg, trace):
        model.forward(tokens, w, cfg, trace=trace)
        for t in w.values():
            t.zero_()
        w.clear()

    assert check_against(vandal, "tiny", "fp32").verdict == "PASS"
    assert sha256_of_weights(weights) == before
    assert check_against(impl_forward, "tiny", "fp32").verdict == "PASS"


def test_weights_too_big_to_copy_are_verified_after_the_call(models, monkeypatch):
    """Above the copy limit (an 8B checkpoint) the weights are handed over as they are and checked by digest."""
    _, weights = models("tiny", "fp32")
    monkeypatch.setattr(golden_check, "COPY_LIMIT_BYTES", 0)
    saved = weights["norm.weight"].clone()

    def vandal(tokens, w, cfg, trace):
        w["norm.weight"].mul_(2)

    try:
        with pytest.raises(golden_check.ImplementationError,
                           match=r"wrote into the weights it was given \(norm\.weight\): weights are read-only"):
            golden_check.run_implementation(vandal, [1, 2, 3], weights, None)
    finally:
        weights["norm.weight"].copy_(saved)


# ---------------------------------------------------------------- 3. a golden must be whole
def _rewrite(src, dst, change, redigest=True):
    """Copy a golden and change it as a hostile tester would: manifest and tensors edited, both sha256 recomputed."""
    shutil.copytree(src, dst)
    m = json.loads((dst / gf.MANIFEST).read_text())
    tensors = dict(st_load((dst / gf.ACTIVATIONS).read_bytes()))
    change(m, tensors)
    blob = st_save(tensors, metadata={"format": f"{gf.FORMAT} {gf.VERSION}"})
    (dst / gf.ACTIVATIONS).write_bytes(blob)
    m["activations_sha256"] = hashlib.sha256(blob).hexdigest()
    if redigest:
        m["manifest_sha256"] = gf.manifest_digest(m)
    (dst / gf.MANIFEST).write_text(json.dumps(m))
    return dst


def _only_tokens(m, t):
    m["stages"] = m["stages"][:1]
    for k in list(t):
        if k != "tokens":
            del t[k]


def _extra_layer(m, t):
    m["stages"].insert(25, {"name": "layers.7.q", "shape": [17, 8, 16], "dtype": "float32"})
    t["layers.7.q"] = torch.zeros(17, 8, 16)


def _set(path, value):
    def change(m, t):
        *parents, last = path.split(".")
        node = m
        for p in parents:
            node = node[p]
        node[last] = value
    return change


def _token(i, value, tensor_too=False):
    def change(m, t):
        m["tokens"][i] = value
        if tensor_too:
            t["tokens"] = torch.tensor(m["tokens"])
    return change


NOT_WHOLE = {
    "only-tokens": (_only_tokens, True, r"manifest\.json: holds 1 of the model's 243 stages; missing embeddings, "
                                        r"rope_cos, rope_sin; residual_in, .* in layers 0-1; norm, logits, "
                                        r"logprobs_last; in decode steps 1-8: every stage$"),
    "extra-layer": (_extra_layer, True, r"manifest\.json: stage layers\.7\.q is outside the model \(2 layers\)$"),
    "edited-prompt": (_set("prompt", "the answer to the ultimate question of life is "), True,
                      r"manifest\.json: the prompt tokenizes to 11 tokens that differ from the golden's 17 at "
                      r"position 9 \(edited prompt or tokens\)$"),
    "edited-prompt-no-digest": (_set("prompt", "the answer is "), False,
                                r"manifest\.json: content does not match its manifest_sha256 \(edited after "
                                r"recording\); re-record it with `python -m golden record --model tiny --prompt "),
    "edited-attention": (_set("attn_implementation", "sdpa"), True,
                         r"derived: \['scores'\] does not go with attention sdpa"),
    "edited-token-id": (_token(3, 42), True, r"tokens do not agree with the golden's `tokens` tensor"),
    "edited-token-everywhere": (_token(3, 42, tensor_too=True), True,
                                r"the prompt tokenizes to 17 tokens that differ from the golden's 17 at position 3"),
    "negative-token": (_token(3, -5, tensor_too=True), True,
                       r"token id -5 is outside the vocabulary \[0, 128256\)$"),
    "token-past-vocab": (_token(0, 128256, tensor_too=True), True, r"token id 128256 is outside the vocabulary"),
    "stages-not-a-list": (_set("stages", {"name": "tokens"}), True, r"stages: a list of objects expected, got dict$"),
    "stage-not-an-object": (lambda m, t: m["stages"].__setitem__(2, "rope_cos"), True,
                            r"stages: a list of objects expected, got list$"),
    "tokens-a-string": (_set("tokens", "1 2 3"), True, r"tokens: a non-empty list of integers expected, got str$"),
    "model-a-list": (_set("model", ["tiny"]), True, r"model: a JSON object expected, got list$"),
    "config-field-a-string": (_set("model.config.dim", "128"), True,
                              r"model config unreadable \(config: dim must be a positive integer, got '128'\)$"),
    "weights-sha-malformed": (_set("model.weights_sha256", 7), True,
                              r"model\.weights_sha256: 64 lowercase hex digits expected, got int$"),
    "model-name-a-path": (_set("model.name", "/etc"), True,
                          r"recorded for model '/etc', which check loads only when you name it: pass --model"),
    "model-name-a-hub-id": (_set("model.name", "meta-llama/Meta-Llama-3-8B"), True,
                            r"recorded for model 'meta-llama/Meta-Llama-3-8B', which check loads only when you name "
                            r"it"),
    "version-1": (_set("version", 1), True,
                  r"golden format version 1 is older than this reader's 2; re-record it with `python -m golden "
                  r"record --model tiny --prompt 'the answer to the ultimate question of life, the universe, and "
                  r"everything is ' --dtype fp32 --out \S+` \(the committed baselines: `python -m golden "
                  r"record-baselines`\)$"),
    "decode-section": (_set("decode", {"steps": 2}), True, r"manifest\.json: decode: missing 'greedy'$"),
}


# diff loads no model, so a golden's model name is no danger there: those two cases run on check only.
NOT_WHOLE_CASES = [(command, *spec) for name, spec in NOT_WHOLE.items() for command in ("check", "diff")
                   if command == "check" or not name.startswith("model-name")]
NOT_WHOLE_IDS = [f"{name}-{command}" for name in NOT_WHOLE for command in ("check", "diff")
                 if command == "check" or not name.startswith("model-name")]


@pytest.mark.parametrize(("command", "change", "redigest", "message"), NOT_WHOLE_CASES, ids=NOT_WHOLE_IDS)
def test_golden_that_is_not_whole_is_refused_in_one_line(tmp_path, capsys, command, change, redigest, message):
    bad = _rewrite(golden_dir("tiny", "fp32"), tmp_path / "bad", change, redigest)
    args = ["check", str(bad)] if command == "check" else ["diff", TINY, str(bad)]
    assert cli.main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured
    assert re.search(message, captured.err.rstrip("\n")), captured.err


def test_manifest_nested_too_deeply_is_one_line(tmp_path, capsys):
    shutil.copytree(TINY, tmp_path / "g")
    (tmp_path / "g" / gf.MANIFEST).write_text("[" * 200_000 + "]" * 200_000)
    assert cli.main(["check", str(tmp_path / "g")]) == 2
    assert capsys.readouterr().err.endswith("manifest.json: not a golden manifest (JSON nested too deeply)\n")


def test_prompt_check_is_skipped_and_said_so_without_the_tokenizer(tmp_path, monkeypatch, capsys):
    """Offline, no tokenizer on disk: the check runs, says the prompt was not re-tokenized, and fetches nothing."""
    monkeypatch.setenv("LLAMA3_GOLDEN_CACHE", str(tmp_path / "empty-cache"))
    assert cli.main(["check", TINY, "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    why = "not re-tokenized: tokenizer llama3-tokenizer is not on disk (python -m impl fetch llama3-tokenizer)"
    assert f"  prompt: {why}\n" in out and "PASS: 43/43" in out
    assert json.loads((tmp_path / "r.json").read_text())[0]["prompt_check"] == why
    assert not (tmp_path / "empty-cache").exists()


@pytest.mark.parametrize(("model", "exit_code", "shown"), [
    ("tiny", 0, "PASS: 43/43"),
    ("tiny-scaled", 2, "golden was recorded for model tiny (weights sha fe696b71d167), not tiny-scaled"),
], ids=["same-model", "other-model"])
def test_check_model_option_loads_the_named_model_and_verifies_it(capsys, model, exit_code, shown):
    assert cli.main(["check", TINY, "--model", model]) == exit_code
    captured = capsys.readouterr()
    assert shown in captured.out + captured.err


# ---------------------------------------------------------------- 5. the promise for usage errors
@pytest.mark.parametrize("args", [["check", "--dtype", "fp16"], ["nosuchcommand"], [], ["diff", "onlyone"]],
                         ids=["bad-choice", "unknown-command", "no-command", "missing-argument"])
def test_usage_error_is_one_line_exit_2(capsys, args):
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: python -m golden") and err.count("\n") == 1 and "(see --help)" in err, err
