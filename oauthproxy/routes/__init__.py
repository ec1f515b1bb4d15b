"""URL patterns per area; ``oauthproxy.urls`` stitches them into the layout of DESIGN §2."""
