"""unimo orchestrator package."""
