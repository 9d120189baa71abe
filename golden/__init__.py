"""Golden data: every intermediate activation of the Hugging Face reference, and the tools to compare against it.

`golden.record` runs transformers' LlamaForCausalLM with hooks, `golden.format` reads and writes
golden folders, `golden.compare` measures an implementation against one (metrics and verdict),
`golden.check` runs an implementation (or a second golden) and compares, `golden.report` renders
what they found (text, JSON, PNG, pytest messages), `golden.cli` is `python -m golden`.
"""
