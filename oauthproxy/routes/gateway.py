"""Routes for gateway (see oauthproxy/urls.py for the layout)."""

urlpatterns: list = []
