"""Integrations of proxyattn with model libraries.

`proxyattn.integrations.transformers`: an attention function for Hugging Face transformers
(sparse ProxyAttn prefill, transformers' own SDPA for decoding and everything else). It is
imported on demand so that `import proxyattn` never needs transformers.
"""
