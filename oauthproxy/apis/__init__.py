"""DRF views: registration, metadata, management API."""
