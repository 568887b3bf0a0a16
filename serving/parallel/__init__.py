"""Running one model over several workers: tensor parallelism inside a node, pipeline stages across."""
