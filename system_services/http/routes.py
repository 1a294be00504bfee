"""Every endpoint of the HTTP server, by (method, path)."""

from system_services.http import openai_api

ROUTES = {**openai_api.ROUTES}
