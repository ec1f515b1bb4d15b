"""Routes for registration (see oauthproxy/urls.py for the layout)."""

urlpatterns: list = []
