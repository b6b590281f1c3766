"""Data: tokenizers, preprocessing, the Megatron .bin/.idx format, GPT datasets, the default corpus.

Modules are imported on demand (`neox.data.tokenizers`, `neox.data.preprocess`, `neox.data.indexed`,
`neox.data.gpt_dataset`, `neox.data.default_corpus`); none imports torch or megatron-core until a
function needs it. See docs/data.md.
"""
