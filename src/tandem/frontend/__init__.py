"""OpenAI-compatible HTTP frontend: request/response protocol, errors and sampling mapping."""
