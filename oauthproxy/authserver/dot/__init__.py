"""django-oauth-toolkit swap points only: the validator, the scopes backend."""
