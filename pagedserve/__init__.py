"""pagedserve: an LLM serving engine with a paged KV cache and continuous batching."""

__version__ = "0.1.0"
