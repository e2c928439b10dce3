"""Model execution: checkpoint readers, model loading, the worker-side model runner."""
