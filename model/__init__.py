"""unimo model package."""
