"""Open-Sora-style text-to-video training pipeline: the domain library behind the flows and CLI."""

__version__ = "0.1.0"
