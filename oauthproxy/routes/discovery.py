"""Routes for discovery (see oauthproxy/urls.py for the layout)."""

urlpatterns: list = []
