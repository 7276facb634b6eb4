"""fastsend: an outbound mail transfer agent for bulk and transactional mail."""

__version__ = "0.1.0"
