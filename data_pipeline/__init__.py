"""unimo data_pipeline package."""
