"""llmosd's HTTP endpoint: OpenAI- and Ollama-compatible APIs on a unix socket (docs/http-api.md)."""
