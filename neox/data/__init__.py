"""Data: tokenizers, the embedded default corpus, and GPT datasets over megatron-core.

Modules are imported on demand (`neox.data.tokenizers`, `neox.data.default_corpus`,
`neox.data.gpt_dataset`); none imports torch or megatron-core until a function needs it.
"""
