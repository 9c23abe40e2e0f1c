"""The HTTP API (`ziya-batch serve`): app.py builds the FastAPI app (jobs, health, metrics), openai_batch.py
the OpenAI Batch subset, access.py the token and allow-list checks, serve.py puts it on Ray Serve."""
