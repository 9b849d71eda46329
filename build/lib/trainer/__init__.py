"""unimo trainer package."""
