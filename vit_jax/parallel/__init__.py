"""Multi-device and multi-host start-up (placeholder; the lead reconciles this package)."""
