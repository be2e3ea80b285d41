"""Reading and writing checkpoints lazily, tensor by tensor and row range by row range."""
