"""Password hasher for generated client secrets.

Client secrets issued at registration are 256 random bits. Stretching (PBKDF2's million iterations) exists
to slow down guessing of low-entropy human passwords and adds nothing against a 256-bit secret, while it
costs ~200 ms of CPU on every confidential client's token request. One salted PBKDF2-SHA256 iteration keeps
the stored value a one-way hash (DESIGN §5.1) at a fraction of the cost. Never used for user passwords:
it is not first in PASSWORD_HASHERS and only django-oauth-toolkit asks for it by name.
"""

from django.contrib.auth.hashers import PBKDF2PasswordHasher


class GeneratedSecretHasher(PBKDF2PasswordHasher):
    algorithm = "pbkdf2_sha256_generated_secret"
    iterations = 1
