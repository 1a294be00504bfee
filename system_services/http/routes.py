"""Every endpoint of the HTTP server, by (method, path)."""

from system_services.http import metrics, ollama_api, ollama_info, openai_api

ROUTES = {**openai_api.ROUTES, **ollama_api.ROUTES, **ollama_info.ROUTES, **metrics.ROUTES}
