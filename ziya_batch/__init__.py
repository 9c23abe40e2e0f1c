"""ziya-batch: batch generation jobs for Ziya-LLaMA-13B on Redis and Ray."""

__version__ = "0.1.0"
