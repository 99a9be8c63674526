"""Integrations of proxyattn with model libraries.

`proxyattn.integrations.transformers`: an attention function for Hugging Face transformers
(sparse ProxyAttn prefill, transformers' own SDPA for decoding and everything else).
`proxyattn.integrations.sglang`: an SGLang attention backend for prefill (extend) over SGLang's
paged KV pool, through proxy_attention_paged; decoding stays with another backend.
`proxyattn.integrations.vllm`: a vLLM (V1) attention backend, FlashAttention's with prefill rows
through proxy_attention_paged.
Each is imported on demand, so `import proxyattn` never needs transformers, SGLang or vLLM.
"""
