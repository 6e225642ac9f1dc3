"""The durable job queue and the workers that run jobs."""
