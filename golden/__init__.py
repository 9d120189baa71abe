"""Golden data: every intermediate activation of the Hugging Face reference, and the tools to compare against it.

`golden.record` runs transformers' LlamaForCausalLM with hooks, `golden.format` reads and writes
golden folders, `golden.compare` measures an implementation against one, `golden.cli` is
`python -m golden`.
"""
