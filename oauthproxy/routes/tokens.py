"""Routes for tokens (see oauthproxy/urls.py for the layout)."""

urlpatterns: list = []
