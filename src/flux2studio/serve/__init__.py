"""HTTP API, persistent job queue and studio web page (the `serve` extra: fastapi, uvicorn)."""
