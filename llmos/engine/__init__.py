"""The in-process engine: KV cache, sampling, model runner, scheduler loop."""
