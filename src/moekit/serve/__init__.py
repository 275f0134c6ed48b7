"""Serving: the OpenAI-compatible HTTP server, its continuous-batching engine, and expert placement across devices."""
