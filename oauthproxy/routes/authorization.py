"""Routes for authorization (see oauthproxy/urls.py for the layout)."""

urlpatterns: list = []
