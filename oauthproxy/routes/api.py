"""Routes for api (see oauthproxy/urls.py for the layout)."""

urlpatterns: list = []
