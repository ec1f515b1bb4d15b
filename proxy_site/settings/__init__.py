"""Settings are split by environment: ``local`` (make run), ``test`` (make test), ``production``.

Every value an operator may change comes from an environment variable, read in ``env.py``.
"""
