"""The engine: one MLX worker thread per model, the streaming session and THE token loop."""
