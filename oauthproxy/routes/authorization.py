"""Routes for authorization: /oauth/<slug>/authorize, /consent, /callback (DESIGN §2, §4)."""

from django.urls import path

from ..views import authorize, callback, consent

urlpatterns: list = [
    path("oauth/<slug:slug>/authorize", authorize.authorize, name="oauth-authorize"),
    path("oauth/<slug:slug>/consent", consent.consent, name="oauth-consent"),
    path("oauth/<slug:slug>/callback", callback.callback, name="oauth-callback"),
]
