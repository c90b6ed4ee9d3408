"""HTTP layer: protocol models, thin routes, OpenAI-shaped errors."""
